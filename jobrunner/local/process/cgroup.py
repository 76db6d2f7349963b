"""Memory cgroups for local machines: one cgroup per process, with a limit and an OOM counter.

Where the cgroups go: below the supervisor's OWN memory cgroup, in a `jobrunner/` child
(`<mount>/<own cgroup>/jobrunner/<name>-<token>`). When the supervisor runs in the root cgroup
this is `/sys/fs/cgroup/memory/jobrunner/<name>-…` on cgroup v1. Nesting keeps jobs inside any
limit set for the server itself (a container, a systemd unit) instead of escaping it.

cgroup v1 (memory controller mounted on its own) is preferred when present; otherwise cgroup v2
with the memory controller. v2 only allows this when the supervisor's cgroup can delegate the
memory controller (no processes of its own besides the root), so it is often unavailable there;
`find_cgroup_root()` then returns None with the reason and the supervisor falls back to its RSS
watchdog.

The launcher joins a cgroup by writing its pid to `MemoryCgroup.procs_file` (path in its spec).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CgroupRoot", "MemoryCgroup", "find_cgroup_root"]

logger = logging.getLogger(__name__)

_ROOT_NAME = "jobrunner"


@dataclass(frozen=True)
class CgroupRoot:
    """A directory under which per-process memory cgroups can be created.

    The directory itself is removed whenever its last cgroup goes (`remove_if_unused`), so that
    nothing is left inside the supervisor's own cgroup once no machine runs; `create` makes it
    again as needed.
    """

    path: Path
    version: int  # 1 or 2

    def ensure(self) -> None:
        """Create the directory (and on v2 hand the memory controller down to its children)."""
        self.path.mkdir(exist_ok=True)
        if self.version == 2:
            _enable_memory(self.path)

    def create(self, name: str, limit_bytes: int) -> MemoryCgroup:
        """Create a cgroup for one process, with `limit_bytes` of memory and no swap."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "machine"
        path = self.path / f"{safe}-{secrets.token_hex(4)}"
        for attempt in range(3):
            self.ensure()
            try:
                path.mkdir()
                break
            except FileNotFoundError:
                # Another machine's exit removed the (then empty) root in between; again.
                if attempt == 2:
                    raise
        group = MemoryCgroup(path, self.version)
        try:
            group.set_limit(limit_bytes)
        except OSError:
            group.remove()
            raise
        return group

    def remove_if_unused(self) -> None:
        """Remove the directory if no cgroup is left in it (it is busy otherwise)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()


@dataclass(frozen=True)
class MemoryCgroup:
    """One process's memory cgroup."""

    path: Path
    version: int

    @property
    def root(self) -> CgroupRoot:
        """The directory this cgroup was created in."""
        return CgroupRoot(self.path.parent, self.version)

    @property
    def procs_file(self) -> Path:
        """The file a process writes its pid to in order to join."""
        return self.path / "cgroup.procs"

    def set_limit(self, limit_bytes: int) -> None:
        """Write the memory limit; swap is capped too where the kernel allows it."""
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            # memsw (memory+swap) only exists with swap accounting; without swap it is moot.
            with contextlib.suppress(OSError):
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        else:
            (self.path / "memory.max").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):
                (self.path / "memory.swap.max").write_text("0")
            with contextlib.suppress(OSError):
                # On OOM kill every process in the group, not just the biggest one.
                (self.path / "memory.oom.group").write_text("1")

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 when unknown)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            text = (self.path / name).read_text()
        except OSError:
            return 0
        match = re.search(r"^oom_kill (\d+)$", text, re.MULTILINE)
        return int(match.group(1)) if match else 0

    def pids(self) -> list[int]:
        """Pids currently in the cgroup."""
        try:
            return [int(x) for x in self.procs_file.read_text().split()]
        except (OSError, ValueError):
            return []

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup (catches children that left the process group)."""
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Remove the cgroup; False while processes are still in it."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of every mount."""
    result = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            before, _, after = line.partition(" - ")
            fields, tail = before.split(), after.split()
            if len(fields) >= 5 and len(tail) >= 3:
                result.append((fields[4], tail[0], tail[2]))
    return result


def _own_cgroup(version: int) -> str:
    """This process's cgroup path in the v1 memory hierarchy or the v2 unified one."""
    with open("/proc/self/cgroup", encoding="utf-8") as fh:
        for line in fh:
            hier, controllers, path = line.rstrip("\n").split(":", 2)
            if version == 1 and "memory" in controllers.split(","):
                return path
            if version == 2 and hier == "0" and controllers == "":
                return path
    return "/"


def _base_dir(mount_point: str, own: str) -> Path:
    # In a container the cgroup path in /proc/self/cgroup may not exist below the mount (the
    # mount already IS our cgroup); then the mount point itself is the base.
    candidate = Path(mount_point) / own.lstrip("/")
    return candidate if candidate.is_dir() else Path(mount_point)


def _v1_root() -> CgroupRoot:
    mount = next(
        (m for m, fs, opts in _mounts() if fs == "cgroup" and "memory" in opts.split(",")), None
    )
    if mount is None:
        raise OSError("no cgroup v1 memory hierarchy is mounted")
    root = CgroupRoot(_base_dir(mount, _own_cgroup(1)) / _ROOT_NAME, 1)
    root.ensure()
    return root


def _enable_memory(directory: Path) -> None:
    controls = directory / "cgroup.subtree_control"
    if "memory" not in controls.read_text().split():
        controls.write_text("+memory")


def _v2_root() -> CgroupRoot:
    mount = next((m for m, fs, _ in _mounts() if fs == "cgroup2"), None)
    if mount is None:
        raise OSError("no cgroup v2 hierarchy is mounted")
    if "memory" not in (Path(mount) / "cgroup.controllers").read_text().split():
        raise OSError(f"the memory controller is not available in {mount}")
    base = _base_dir(mount, _own_cgroup(2))
    _enable_memory(base)  # EBUSY when our own cgroup holds processes and is not the root
    root = CgroupRoot(base / _ROOT_NAME, 2)
    root.ensure()
    return root


_cached: tuple[CgroupRoot | None, str] | None = None


def find_cgroup_root(refresh: bool = False) -> tuple[CgroupRoot | None, str]:
    """Find (and create) where per-process memory cgroups go.

    Returns (root, "") or (None, reason) when memory cgroups cannot be used here; the answer is
    cached for the life of the process.
    """
    global _cached
    if _cached is not None and not refresh:
        return _cached
    reasons = []
    root: CgroupRoot | None = None
    for finder in (_v1_root, _v2_root):
        try:
            root = finder()
            break
        except OSError as exc:
            reasons.append(str(exc))
    if root is not None:
        root.remove_if_unused()  # created only to prove it works; made again on first use
    _cached = (root, "" if root else "; ".join(reasons))
    if root is None:
        logger.warning(
            "memory cgroups unavailable (%s); memory limits use the RSS watchdog instead",
            _cached[1],
            extra={"action": "cgroup"},
        )
    return _cached
