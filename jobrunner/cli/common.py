"""What every command shares: the --json/--backend/--app options, consoles, and error handling."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from rich.console import Console

from jobrunner.cli import exitcodes
from jobrunner.config import BACKENDS, Settings
from jobrunner.errors import ConfigError, JobrunnerError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class CliContext:
    json: bool
    backend: str | None
    app: str | None

    def settings(self) -> Settings:
        return Settings.from_env(backend=self.backend, app=self.app)


def _console(stderr: bool) -> Console:
    # rich honours NO_COLOR itself; highlight=False keeps job output exactly as the job wrote it.
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


out = _console(stderr=False)
err = _console(stderr=True)


def utf8_flag(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A click callback refusing a flag's text that is not valid UTF-8 (exit 2).

    The shell passes bytes that are not UTF-8 as lone surrogates, which no API or ledger query can
    carry; without this the command would fail later with an internal error.
    """
    from jobrunner.spec.text import utf8_problem

    problem = utf8_problem(value) if isinstance(value, str) else None
    if problem is not None:
        raise click.BadParameter(f"{problem}; pass UTF-8 text", ctx=ctx, param=param)
    return value


def common_options(fn: F) -> F:
    """Add --json, --backend and --app to a command and pass a CliContext as ``ctx``."""

    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
    @click.option(
        "--backend",
        type=click.Choice(BACKENDS),
        envvar="JOBRUNNER_BACKEND",
        help="Machines backend [env JOBRUNNER_BACKEND; default: fly if FLY_API_TOKEN is set, "
        "else local].",
    )
    @click.option(
        "--app",
        envvar="FLY_APP",
        callback=utf8_flag,
        help="Fly app the machines run in [env FLY_APP].",
    )
    @functools.wraps(fn)
    def wrapper(*args: Any, as_json: bool, backend: str | None, app: str | None, **kw: Any) -> Any:
        return fn(*args, ctx=CliContext(json=as_json, backend=backend, app=app), **kw)

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def exit_for_error(exc: BaseException) -> int:
    """The documented exit code (docs/cli.md) for an expected error."""
    from jobrunner.spec import JobSpecError
    from jobrunner.store import AmbiguousRunId, InvalidRunId, RunNotFound

    if isinstance(exc, JobSpecError):
        return exitcodes.INVALID_JOB
    if isinstance(exc, ConfigError):
        return exitcodes.CONFIG
    if isinstance(exc, (RunNotFound, AmbiguousRunId, InvalidRunId)):
        return exitcodes.USAGE  # a RUN argument that names no single run
    return exitcodes.BACKEND_ERROR


class JobrunnerGroup(click.Group):
    """The top-level group: turns expected errors into one clear line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            except BaseExceptionGroup as group:
                # anyio task groups wrap what their tasks raise; report the error inside.
                raise _sole_error(group) from None
        except JobrunnerError as exc:
            err.print(f"[bold red]error:[/] {_escape(str(exc))}")
            ctx.exit(exit_for_error(exc))
        except KeyboardInterrupt:
            err.print("interrupted")
            ctx.exit(exitcodes.CANCELLED)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            # A bug, not bad input: one line by default, the traceback on request.
            if os.environ.get("JOBRUNNER_DEBUG"):
                raise
            err.print(
                f"[bold red]internal error:[/] {_escape(type(exc).__name__)}: {_escape(str(exc))}"
                " (set JOBRUNNER_DEBUG=1 for the traceback, and please report it)"
            )
            ctx.exit(exitcodes.ERROR)


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    from jobrunner.runner import sole_error

    return sole_error(group)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def color_enabled() -> bool:
    return "NO_COLOR" not in os.environ and out.is_terminal
