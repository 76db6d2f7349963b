"""What an image runs by default: a catalog of well-known images' ENTRYPOINT and CMD.

Fly's ``config.image`` is the only required field of a machine config: with no ``init`` the
image's own ENTRYPOINT and CMD run. The local backend never pulls images, so it cannot read them;
instead it looks the image up in this catalog, mapped to what makes sense on this computer (the
local backend runs the command on the host: ``python:*`` runs the ``python3`` on the machine's
PATH, ``alpine`` runs ``/bin/sh``).

Users extend or override the catalog with a TOML or JSON file: the one named by the server's
``JOBRUNNER_LOCAL_IMAGES`` environment variable, else ``<state dir>/images.toml`` when it exists.
It is re-read when it changes, so no restart is needed::

    [images."myorg/worker:*"]        # a pattern (fnmatch) on the image reference
    entrypoint = []
    cmd = ["python3", "-m", "worker"]

A pattern is matched against the image as written (``registry.example/team/app:1``), and against
its short forms: ``repository:tag`` and ``repository`` with Docker Hub's ``library/`` and
registry left out (``python:3.12-slim``, ``python``). The user's entries are tried first, then the
built-in ones; the first match wins.

The argv follows fly-machines-api.md section 8: ``init.exec`` if set; otherwise (``init.entrypoint``
or the image's ENTRYPOINT) + (``init.cmd`` or the image's CMD), except that a custom
``init.entrypoint`` drops the image's CMD, as Docker does (open question 16). For an image the
catalog does not know, the ENTRYPOINT and CMD count as empty: ``init.cmd`` alone still works, and a
config with no command at all gives a machine that starts, prints what to configure on stderr and
exits with ``NO_COMMAND_EXIT_CODE``, as a real machine whose image has no command fails.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner.local.fleet.records import image_ref_for

__all__ = [
    "BUILTIN_IMAGES",
    "IMAGES_ENV",
    "IMAGES_FILE",
    "NO_COMMAND_EXIT_CODE",
    "ImageCatalog",
    "ImageDefaults",
    "resolve_command",
]

logger = logging.getLogger("jobrunner.local")

IMAGES_ENV = "JOBRUNNER_LOCAL_IMAGES"
IMAGES_FILE = "images.toml"
#: The exit code of a machine with nothing to run (127: "command not found", as a shell says).
NO_COMMAND_EXIT_CODE = 127


@dataclass(frozen=True)
class ImageDefaults:
    """An image's ENTRYPOINT and CMD, as the local backend runs them."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()


def _image(entrypoint: list[str], cmd: list[str]) -> ImageDefaults:
    return ImageDefaults(tuple(entrypoint), tuple(cmd))


# The images' own CMD, mapped to the host: the official images' ENTRYPOINT scripts
# (docker-entrypoint.sh) exist only inside the images, so they are left out; what they end up
# running is kept. With stdin from /dev/null, the interpreters and shells exit at once (0).
BUILTIN_IMAGES: dict[str, ImageDefaults] = {
    "python": _image([], ["python3"]),
    "pypy": _image([], ["pypy3"]),
    "alpine": _image([], ["/bin/sh"]),
    "busybox": _image([], ["sh"]),
    "debian": _image([], ["bash"]),
    "ubuntu": _image([], ["bash"]),
    "fedora": _image([], ["/bin/bash"]),
    "rockylinux": _image([], ["/bin/bash"]),
    "amazonlinux": _image([], ["/bin/bash"]),
    "bash": _image([], ["bash"]),
    "node": _image([], ["node"]),
    "ruby": _image([], ["irb"]),
    "golang": _image([], ["bash"]),
    "rust": _image([], ["bash"]),
    "perl": _image([], ["perl", "-de0"]),
    "hello-world": _image([], ["echo", "Hello from Docker! (the local backend's hello-world)"]),
}


class ImageCatalog:
    """The built-in catalog plus the user's file, re-read whenever the file changes."""

    def __init__(self) -> None:
        self._loaded_from: tuple[str, float, int] | None = None
        self._user: dict[str, ImageDefaults] = {}

    def lookup(
        self, image: str, *, state_dir: Path | None, environ: Mapping[str, str]
    ) -> ImageDefaults | None:
        """The image's defaults, or None when neither the user's file nor the catalog knows it.

        Raises ValueError (naming the file) when the user's file cannot be read.
        """
        user = self._user_entries(state_dir, environ)
        names = _names(image)
        for table in (user, BUILTIN_IMAGES):
            for pattern, defaults in table.items():
                if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                    return defaults
        return None

    def config_source(self, state_dir: Path | None, environ: Mapping[str, str]) -> str:
        """Where the user's entries come from (for messages)."""
        path = _config_path(state_dir, environ)
        if environ.get(IMAGES_ENV):
            return f"the file named by {IMAGES_ENV} ({path})"
        return str(path) if path is not None else f"<state dir>/{IMAGES_FILE}"

    def _user_entries(
        self, state_dir: Path | None, environ: Mapping[str, str]
    ) -> dict[str, ImageDefaults]:
        path = _config_path(state_dir, environ)
        if path is None:
            self._user, self._loaded_from = {}, None
            return self._user
        try:
            stat = path.stat()
        except FileNotFoundError:
            if environ.get(IMAGES_ENV):
                raise ValueError(f"{IMAGES_ENV} names {path}, which does not exist") from None
            self._user, self._loaded_from = {}, None
            return self._user
        key = (str(path), stat.st_mtime, stat.st_size)
        if key != self._loaded_from:
            self._user = parse_catalog_file(path)
            self._loaded_from = key
        return self._user


def _config_path(state_dir: Path | None, environ: Mapping[str, str]) -> Path | None:
    named = environ.get(IMAGES_ENV)
    if named:
        return Path(named).expanduser()
    return state_dir / IMAGES_FILE if state_dir is not None else None


def parse_catalog_file(path: Path) -> dict[str, ImageDefaults]:
    """The ``[images."pattern"]`` tables of a TOML file (or the same object in a JSON file)."""
    try:
        text = path.read_text(encoding="utf-8")
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cannot read the image catalog {path}: {exc}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, dict):
        raise ValueError(
            f'the image catalog {path} needs an "images" table: [images."python:*"] with '
            "entrypoint and cmd lists"
        )
    found: dict[str, ImageDefaults] = {}
    for pattern, entry in images.items():
        if not isinstance(entry, dict) or set(entry) - {"entrypoint", "cmd"}:
            raise ValueError(
                f"{path}: images.{pattern!r} must be a table with only entrypoint and cmd"
            )
        parts: dict[str, tuple[str, ...]] = {}
        for key in ("entrypoint", "cmd"):
            value = entry.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{path}: images.{pattern!r}.{key} must be a list of strings")
            parts[key] = tuple(value)
        found[str(pattern)] = ImageDefaults(parts["entrypoint"], parts["cmd"])
    return found


def _short_repository(image: str) -> str:
    """``python`` for ``docker.io/library/python:3``; other registries keep their host."""
    ref = image_ref_for(image)
    repository = ref.repository or ""
    if ref.registry not in (None, "registry-1.docker.io", "docker.io"):
        repository = f"{ref.registry}/{repository}"
    return repository.removeprefix("library/")


def _names(image: str) -> list[str]:
    """The image as written, then ``repository:tag`` and ``repository`` in short form."""
    ref = image_ref_for(image)
    repository = _short_repository(image)
    names = [image, f"{repository}:{ref.tag}", repository]
    if ref.digest:
        names.append(f"{repository}@{ref.digest}")
    return list(dict.fromkeys(names))


_CATALOG = ImageCatalog()


def resolve_command(
    image: str,
    exec_: list[str] | None,
    entrypoint: list[str] | None,
    cmd: list[str] | None,
    *,
    state_dir: Path | None,
    environ: Mapping[str, str] | None = None,
    catalog: ImageCatalog | None = None,
) -> tuple[list[str], str | None]:
    """The argv to run, and None; or a failing argv and the explanation when there is nothing.

    The failing argv is a shell that prints the explanation on stderr (so it reaches the logs)
    and exits with ``NO_COMMAND_EXIT_CODE``: the machine starts and fails like a real one whose
    image has no command. Raises ValueError when the user's catalog file cannot be read.
    """
    environ = os.environ if environ is None else environ
    if exec_:
        return list(exec_), None
    catalog = catalog or _CATALOG
    defaults: ImageDefaults | None = None
    if not entrypoint or not cmd:
        defaults = catalog.lookup(image, state_dir=state_dir, environ=environ)
    if entrypoint:
        argv = [*entrypoint, *(cmd or [])]  # a custom entrypoint drops the image's CMD
    else:
        image_entrypoint = list(defaults.entrypoint) if defaults else []
        argv = [*image_entrypoint, *(cmd or (defaults.cmd if defaults else ()))]
    if argv:
        return argv, None
    if defaults is not None:
        explanation = (
            f"image {image!r} has an empty ENTRYPOINT and CMD in the local backend's image "
            "catalog: set init.cmd (or init.exec) in the machine config, or give the image a "
            f"command in {catalog.config_source(state_dir, environ)}"
        )
    else:
        explanation = (
            f"no command to run: the local backend does not pull images, so it cannot read the "
            f"ENTRYPOINT/CMD of image {image!r}, and its image catalog does not know it. Set "
            "init.cmd (or init.exec) in the machine config, or add the image to "
            f"{catalog.config_source(state_dir, environ)}, e.g. "
            f'[images."{_short_repository(image)}:*"] cmd = ["python3", "main.py"] '
            "(see docs/local-backend.md, Images)"
        )
    return failing_argv(explanation), explanation


def failing_argv(message: str) -> list[str]:
    """A command that prints ``message`` on stderr and exits with ``NO_COMMAND_EXIT_CODE``.

    The machine is recorded ``started`` then ``stopped``, as a real machine whose init finds
    nothing to run (the lifecycle records the start of a program that has already ended).
    """
    script = f'printf "%s\\n" "$1" >&2; exit {NO_COMMAND_EXIT_CODE}'
    return ["/bin/sh", "-c", script, "jobrunner-local", message]
