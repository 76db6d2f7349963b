"""The ``jobrunner`` command line: a thin layer over the library.

Each module holds one family of commands; this one only assembles them.
"""

from __future__ import annotations

import click

from jobrunner import __version__
from jobrunner.cli.common import JobrunnerGroup
from jobrunner.cli.jobs_commands import jobs_group
from jobrunner.cli.run_commands import cancel_command, logs_command, run_command, wait_command
from jobrunner.cli.runs_commands import gc_command, runs_group


@click.group(cls=JobrunnerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jobrunner")
def main() -> None:
    """Run batch jobs as ephemeral Fly Machines (or on the local Machines backend).

    With no FLY_API_TOKEN set, jobs run on the local Machines backend on this computer.
    Exit codes are listed in docs/cli.md.
    """


for command in (run_command, wait_command, cancel_command, logs_command, gc_command):
    main.add_command(command)
main.add_command(runs_group)
main.add_command(jobs_group)


def _add_local_group() -> None:
    from jobrunner.local.cli import local as local_group

    main.add_command(local_group)


_add_local_group()

__all__ = ["main"]
