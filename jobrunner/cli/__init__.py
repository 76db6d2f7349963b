"""The ``jobrunner`` command line: a thin layer over the library."""

from __future__ import annotations

import click

from jobrunner import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jobrunner")
def main() -> None:
    """Run batch jobs as ephemeral Fly Machines (or on the local Machines backend)."""


__all__ = ["main"]
