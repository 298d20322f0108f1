"""The ``erc-stream`` command, one module per command group; each command is a thin shell over a module that
does the work."""

from erc_stream.cli import bench, config, models, outputs, services, stream  # noqa: F401 - they register commands
from erc_stream.cli.root import main

__all__ = ["main"]
