"""``erc-stream services``: the local broker and Redis (:mod:`local_services`)."""

from __future__ import annotations

import click

from core.settings import Settings
from erc_stream.cli.root import main, settings_of


@main.group()
def services() -> None:
    """Local broker (tansu) and Redis for development, tests and the demo."""


def _print_statuses(statuses) -> None:
    for s in statuses:
        state = "running" if s.running else "stopped"
        how = "managed" if s.managed else "external" if s.running else ""
        pid = f" pid={s.pid}" if s.pid else ""
        click.echo(f"{s.name:<6} {s.address:<22} {state:<8} {how:<8}{pid}  {s.detail}".rstrip())


def _service_call(fn, settings: Settings) -> None:
    from local_services.supervisor import ServiceError

    try:
        _print_statuses(fn(settings))
    except ServiceError as e:
        raise click.ClickException(str(e)) from e


@services.command("up")
@click.pass_context
def services_up_cmd(ctx: click.Context) -> None:
    """Start the broker and Redis if they are not running, and create the topics."""
    from local_services.supervisor import services_up

    _service_call(services_up, settings_of(ctx))


@services.command("down")
@click.pass_context
def services_down_cmd(ctx: click.Context) -> None:
    """Stop what `services up` started (never a service it did not start)."""
    from local_services.supervisor import services_down

    _service_call(services_down, settings_of(ctx))


@services.command("status")
@click.pass_context
def services_status_cmd(ctx: click.Context) -> None:
    """Show whether the broker and Redis answer."""
    from local_services.supervisor import services_status

    _service_call(services_status, settings_of(ctx))
