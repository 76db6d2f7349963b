"""Turning a machine's config into the process the supervisor runs (fly-machines-api.md section 8).

argv comes from ``init``, completed with the image's ENTRYPOINT/CMD from the local image catalog
(images.py: the image is recorded, never pulled); volumes in ``config.mounts`` become bind mounts
of their directories (volumes.py); the environment is ``config.env`` plus the ``FLY_*`` variables
a Fly machine sees; files are decoded from base64. Fly reads ``secret_name`` files from the app's
secrets; the local backend has no secret store, so it reads them from the server's
environment variable ``JOBRUNNER_LOCAL_SECRET_<NAME>`` (base64, like a Fly secret used as a file).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from jobrunner.local.fleet.images import resolve_command
from jobrunner.local.fleet.records import MachineRecord
from jobrunner.local.fleet.volumes import volume_dir
from jobrunner.local.process.supervisor import FileSpec, ProcessSpec

__all__ = ["SECRET_ENV_PREFIX", "LaunchProblem", "build_spec"]

SECRET_ENV_PREFIX = "JOBRUNNER_LOCAL_SECRET_"

logger = logging.getLogger("jobrunner.local")


class LaunchProblem(Exception):
    """The machine's config cannot be turned into a process (the message says why, and the fix)."""


def build_spec(
    machine: MachineRecord, workdir: Path, environ: Mapping[str, str] | None = None
) -> ProcessSpec:
    """The ``ProcessSpec`` for one boot of ``machine`` (``LaunchProblem``: a file is missing)."""
    config = machine.config
    environ = os.environ if environ is None else environ
    init = config.init
    # The machine's workdir is <state dir>/machines/<id> (Lifecycle.workdir).
    state_dir = Path(workdir).parent.parent
    try:
        argv, no_command = resolve_command(
            config.image or "",
            init.exec if init else None,
            init.entrypoint if init else None,
            init.cmd if init else None,
            state_dir=state_dir,
            environ=environ,
        )
    except ValueError as exc:  # the user's image catalog cannot be read
        raise LaunchProblem(str(exc)) from None
    if no_command is not None:
        logger.warning("machine %s: %s", machine.id, no_command)
    mounts = []
    for index, mount in enumerate(config.mounts or []):
        volume_id = str(mount.get("volume"))
        source = volume_dir(state_dir, volume_id)
        if not source.is_dir():
            raise LaunchProblem(
                f"config.mounts[{index}]: volume {volume_id} has no directory at {source}"
            )
        mounts.append((str(source), str(mount.get("path"))))
    env = dict(config.env or {})
    env.update(
        FLY_MACHINE_ID=machine.id,
        FLY_APP_NAME=machine.app,
        FLY_REGION=machine.region,
        FLY_IMAGE_REF=config.image or "",
        FLY_PRIVATE_IP=machine.private_ip,
        FLY_ALLOC_ID=machine.instance_id,
        FLY_MACHINE_VERSION=machine.instance_id,
    )
    files = []
    for index, file in enumerate(config.files or []):
        if file.raw_value is not None:
            encoded = file.raw_value
        else:
            name = file.secret_name or ""
            secret = environ.get(SECRET_ENV_PREFIX + name)
            if secret is None:
                raise LaunchProblem(
                    f"config.files[{index}] ({file.guest_path}) needs secret {name!r}, which the "
                    f"local backend does not have: start the server with {SECRET_ENV_PREFIX}{name} "
                    "set to the base64 content"
                )
            encoded = secret
        try:
            content = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise LaunchProblem(
                f"config.files[{index}] ({file.guest_path}): the content is not valid base64"
            ) from None
        files.append(FileSpec(guest_path=file.guest_path, content=content, mode=file.mode))
    guest = config.guest
    return ProcessSpec(
        argv=argv,
        env=env,
        files=files,
        cpus=guest.cpus if guest else None,
        memory_mb=guest.memory_mb if guest else None,
        workdir=workdir,
        name=machine.name,
        mounts=tuple(mounts),
    )
