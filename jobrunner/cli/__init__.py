"""The ``jobrunner`` command line: a thin layer over the library.

Each module holds one family of commands; this one only names them. Command modules are imported
when their command runs, so ``jobrunner --help`` and ``--version`` answer without loading the
HTTP client, the database layer or the local backend.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from jobrunner import __version__
from jobrunner.cli.common import JobrunnerGroup

# command name -> "module:attribute"
COMMANDS = {
    "run": "jobrunner.cli.run_commands:run_command",
    "wait": "jobrunner.cli.run_commands:wait_command",
    "cancel": "jobrunner.cli.run_commands:cancel_command",
    "logs": "jobrunner.cli.run_commands:logs_command",
    "runs": "jobrunner.cli.runs_commands:runs_group",
    "gc": "jobrunner.cli.runs_commands:gc_command",
    "jobs": "jobrunner.cli.jobs_commands:jobs_group",
    "local": "jobrunner.local.cli:local",
    "worker": "jobrunner.cli.worker_commands:worker_command",
    "queues": "jobrunner.cli.worker_commands:queues_command",
    "scheduler": "jobrunner.cli.schedule_commands:scheduler_command",
    "schedules": "jobrunner.cli.schedule_commands:schedules_group",
}

SHORT_HELP = {
    "run": "Run a job as an ephemeral machine.",
    "wait": "Wait for a run and exit with its exit code.",
    "cancel": "Cancel a run.",
    "logs": "Print a run's captured output.",
    "runs": "Inspect and repair the run ledger.",
    "gc": "Destroy tagged machines no run owns.",
    "jobs": "List and validate job files.",
    "local": "Manage the local Machines backend.",
    "worker": "Claim and run queued runs until stopped.",
    "queues": "Show each queue's waiting, in-flight and dead runs.",
    "scheduler": "Decide cron ticks of scheduled jobs until stopped.",
    "schedules": "Inspect, pause, trigger and sync scheduled jobs.",
}


class LazyGroup(JobrunnerGroup):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing commands must not import them all, so their one-line help is kept here.
        with formatter.section("Commands"):
            formatter.write_dl([(name, SHORT_HELP[name]) for name in sorted(COMMANDS)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jobrunner")
def main() -> None:
    """Run batch jobs as ephemeral Fly Machines (or on the local Machines backend).

    With no FLY_API_TOKEN set, jobs run on the local Machines backend on this computer.
    Exit codes are listed in docs/cli.md.
    """
    # Library warnings (a retried API call, a log copier giving up) go to stderr as one
    # prefixed line each; JOBRUNNER_LOG_LEVEL=INFO or DEBUG shows more.
    level = os.environ.get("JOBRUNNER_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.WARNING),
        format="jobrunner: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


__all__ = ["main"]
