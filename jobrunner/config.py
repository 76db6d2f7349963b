"""Which backend, app, database and state directory jobrunner uses, read once from the environment.

Precedence: explicit arguments (CLI flags, Python keyword arguments), then environment variables.
No Fly token means the local Machines backend; with ``FLY_API_TOKEN`` set the same code drives Fly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from jobrunner.errors import ConfigError

Backend = Literal["local", "fly"]
BACKENDS: tuple[Backend, ...] = ("local", "fly")
DEFAULT_LOCAL_APP = "jobrunner-local"


def jobrunner_home(environ: Mapping[str, str] | None = None) -> Path:
    """The state directory: ``$JOBRUNNER_HOME``, else ``~/.jobrunner``."""
    env = os.environ if environ is None else environ
    raw = env.get("JOBRUNNER_HOME")
    return Path(raw).expanduser() if raw else Path.home() / ".jobrunner"


def make_private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents readable by their owner only (0700).

    Directories that already exist keep their mode: one the user made (and perhaps shares) is
    not changed behind their back. Raises ``OSError`` like ``Path.mkdir``.
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another process made it meanwhile: its mode is its maker's choice
        # mkdir's mode is filtered by the umask, which can only take bits away; a umask of
        # 0 must not leave the group or others anything either.
        os.chmod(directory, 0o700)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (an existing file keeps its mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _has_fly_token(env: Mapping[str, str]) -> bool:
    return bool(env.get("FLY_API_TOKEN") or env.get("FLY_ACCESS_TOKEN"))


def _port(raw: str | None) -> int:
    if not raw:
        return 4280
    if not raw.isdigit() or int(raw) > 65535:
        raise ConfigError(
            f"JOBRUNNER_LOCAL_PORT={raw!r} is not a port number; use 0-65535 (0: any free port)"
        )
    return int(raw)


def parse_queue_limits(
    raw: str | None, *, source: str = "JOBRUNNER_QUEUE_LIMITS"
) -> dict[str, int]:
    """``"default=10,reports=2"`` -> ``{"default": 10, "reports": 2}``: how many runs of each
    queue may be in flight at once, over every worker sharing the ledger."""
    limits: dict[str, int] = {}
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        name, sep, number = item.partition("=")
        name, number = name.strip(), number.strip()
        if not sep or not name or not number.isdigit() or int(number) < 1:
            raise ConfigError(
                f"{source}: {item.strip()!r} is not QUEUE=LIMIT; "
                'write e.g. "default=10,reports=2" (limits are whole numbers from 1)'
            )
        limits[name] = int(number)
    return limits


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Holds no secret: the Fly token stays in the environment."""

    backend: Backend
    app: str
    home: Path
    database_url: str | None
    local_port: int = 4280
    queue_limits: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(
        cls,
        *,
        backend: str | None = None,
        app: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        env = os.environ if environ is None else environ
        chosen = (
            backend or env.get("JOBRUNNER_BACKEND") or ("fly" if _has_fly_token(env) else "local")
        )
        if chosen not in BACKENDS:
            raise ConfigError(
                f"unknown backend {chosen!r} (from --backend or JOBRUNNER_BACKEND); "
                "use 'local' or 'fly'"
            )
        if chosen == "fly" and not _has_fly_token(env):
            raise ConfigError(
                "the fly backend needs a Fly API token: set FLY_API_TOKEN "
                "(create one with `fly tokens create deploy`), or use --backend local"
            )
        resolved_app = app or env.get("FLY_APP")
        if not resolved_app:
            if chosen == "fly":
                raise ConfigError(
                    "no Fly app given: set FLY_APP or pass --app (the app the job machines run in)"
                )
            resolved_app = DEFAULT_LOCAL_APP
        backend_value: Backend = "fly" if chosen == "fly" else "local"
        return cls(
            backend=backend_value,
            app=resolved_app,
            home=jobrunner_home(env),
            database_url=env.get("JOBRUNNER_DATABASE_URL") or None,
            local_port=_port(env.get("JOBRUNNER_LOCAL_PORT")),
            queue_limits=parse_queue_limits(env.get("JOBRUNNER_QUEUE_LIMITS")),
        )

    @property
    def local_state_dir(self) -> Path:
        return self.home / "local"
