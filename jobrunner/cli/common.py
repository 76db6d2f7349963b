"""What every command shares: the --json/--backend/--app options, consoles, and error handling."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from jobrunner.cli import exitcodes
from jobrunner.config import BACKENDS, Settings
from jobrunner.errors import ConfigError, JobrunnerError

if TYPE_CHECKING:
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class CliContext:
    json: bool
    backend: str | None
    app: str | None
    # Whether --backend / --app were given on the command line (not from the environment).
    backend_given: bool = False
    app_given: bool = False

    def settings(self) -> Settings:
        from jobrunner.cli.ledger_read import check_ledger_location

        settings = Settings.from_env(backend=self.backend, app=self.app)
        check_ledger_location()  # a home or ledger that can never work: exit 78, not 74
        return settings


def _no_color() -> bool:
    return "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb"


def _console(stderr: bool) -> Console:
    from rich.console import Console

    # NO_COLOR: no escape code at all (rich alone would still write bold and dim).
    # highlight=False keeps job output exactly as the job wrote it.
    return Console(
        stderr=stderr,
        highlight=False,
        soft_wrap=True,
        color_system=None if _no_color() else "auto",
    )


class _LazyConsole:
    """A rich Console made on first use: commands that print no rich text never import rich."""

    def __init__(self, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def _get(self) -> Console:
        if self._console is None:
            self._console = _console(self._stderr)
        return self._console

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self._get().print(*objects, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)


out = _LazyConsole(stderr=False)
err = _LazyConsole(stderr=True)


def utf8_flag(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A click callback refusing a flag's text that is not valid UTF-8 (exit 2).

    The shell passes bytes that are not UTF-8 as lone surrogates, which no API or ledger query can
    carry; without this the command would fail later with an internal error.
    """
    if isinstance(value, str) and not _is_utf8(value):
        from jobrunner.spec.text import utf8_problem

        problem = utf8_problem(value)
        raise click.BadParameter(f"{problem}; pass UTF-8 text", ctx=ctx, param=param)
    return value


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
        click_ctx = click.get_current_context()
        given = click.core.ParameterSource.COMMANDLINE
        ctx = CliContext(
            json=as_json,
            backend=backend,
            app=app,
            backend_given=click_ctx.get_parameter_source("backend") == given,
            app_given=click_ctx.get_parameter_source("app") == given,
        )
        return fn(*args, ctx=ctx, **kw)

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def exit_for_error(exc: BaseException) -> int:
    """The documented exit code (docs/cli.md) for an expected error."""
    from jobrunner.cli.ledger_read import RunIdError

    if isinstance(exc, ConfigError):
        return exitcodes.CONFIG
    if isinstance(exc, RunIdError):
        return exitcodes.USAGE
    # An error can only be an instance of a class whose module is loaded: checking the spec and
    # store errors only when they are keeps an error on the light read path from importing them.
    if "jobrunner.spec" in sys.modules:
        from jobrunner.spec import JobSpecError

        if isinstance(exc, JobSpecError):
            return exitcodes.INVALID_JOB
    if "jobrunner.store" in sys.modules:
        from jobrunner.store import AmbiguousRunId, InvalidRunId, MigrationError, RunNotFound

        if isinstance(exc, (RunNotFound, AmbiguousRunId, InvalidRunId)):
            return exitcodes.USAGE  # a RUN argument that names no single run
        if isinstance(exc, MigrationError):
            return exitcodes.CONFIG  # a ledger a newer jobrunner wrote: retrying cannot help
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
    from jobrunner.cli.tables import color_enabled as enabled

    return enabled(sys.stdout)
