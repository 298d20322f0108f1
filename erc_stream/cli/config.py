"""``erc-stream config``: the effective settings, and the configuration reference."""

from __future__ import annotations

from pathlib import Path

import click

from erc_stream.cli.root import main, settings_of


@main.command("config")
@click.option("--markdown", is_flag=True, help="Print the configuration reference (every ERC_* variable) as Markdown.")
@click.option("--write-readme", type=click.Path(exists=True, path_type=Path), default=None,
              help="Rewrite the reference between the markers in this README.")
@click.pass_context
def config_cmd(ctx, markdown, write_readme):
    """The effective settings as JSON (secrets masked), or the configuration reference."""
    from erc_stream import settings_doc

    if write_readme:
        changed = settings_doc.update_readme(write_readme)
        click.echo(f"{write_readme}: {'updated' if changed else 'up to date'}")
    elif markdown:
        click.echo(settings_doc.markdown(), nl=False)
    else:
        click.echo(settings_of(ctx).model_dump_json(indent=2))
