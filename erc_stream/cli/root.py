"""The root of the ``erc-stream`` command: its group, the run's settings and the option choices every group shares."""

from __future__ import annotations

from typing import get_args

import click

from core.settings import LabelSetName, Settings
from model_store.data import DATASETS as DATASET_FORMATS

#: The choices of every --label-set and --dataset option (the label sets of settings, the data loaders' formats).
LABEL_SETS = click.Choice(list(get_args(LabelSetName)))
DATASETS = click.Choice(list(DATASET_FORMATS))


def settings_of(ctx: click.Context) -> Settings:
    """The run's settings (the environment's, with the root options applied)."""
    return ctx.obj["settings"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING… (default from ERC_LOG_LEVEL or INFO)")
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """Real-time emotion recognition in conversation (InstructERC) as a Kafka stream processor.

    Configuration comes from ERC_* environment variables (see core/settings.py); options
    below override them for one run.
    """
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from core.logs import configure

    try:
        settings = Settings()
    except ValidationError as e:  # a bad ERC_* variable: say which, not a traceback (secrets are masked in it)
        raise click.ClickException(f"invalid configuration (ERC_* environment): {e}") from e
    except SettingsError as e:  # a variable that is not valid JSON: its name only (the value may hold a secret)
        raise click.ClickException(f"invalid configuration (ERC_* environment): {e}") from None
    if log_level:
        settings = settings.model_copy(update={"log_level": log_level})
    configure(settings.log_level, settings.log_json)
    ctx.obj = {"settings": settings}
