"""Thin wrappers over the Linux mount syscalls the launcher needs (unshare, mount, umount2).

Python 3.11 has no os.mount, and os.unshare only arrived in 3.12, so these go through libc with
ctypes. Every failure raises OSError with the real errno, so callers can say why a mount failed.
ctypes is imported lazily: jobs without files should not pay for it at start-up.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "CLONE_NEWNS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_PRIVATE",
    "MS_REC",
    "make_rprivate",
    "mount",
    "mount_points",
    "umount_detach",
    "unshare_mount_namespace",
]

CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

_libc: Any = None


def _load_libc() -> Any:
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare_mount_namespace() -> None:
    """Move the calling (single-threaded) process into a new, private mount namespace."""
    unshare = getattr(os, "unshare", None)
    if unshare is not None:  # Python >= 3.12
        unshare(CLONE_NEWNS)
        return
    _check(_load_libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")


def make_rprivate() -> None:
    """Stop mount events propagating between this namespace and the host (--make-rprivate /)."""
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    """mount(2); raises OSError naming the target when it fails."""
    libc = _load_libc()
    result = libc.mount(
        None if source is None else os.fsencode(source),
        os.fsencode(target),
        None if fstype is None else fstype.encode(),
        flags,
        None if data is None else os.fsencode(data),
    )
    _check(result, f"mount {fstype or 'bind'} on {target!r}")


def umount_detach(target: str) -> None:
    """umount2(target, MNT_DETACH): lazily detach a mount and everything below it."""
    _check(_load_libc().umount2(os.fsencode(target), MNT_DETACH), f"umount {target!r}")


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_points() -> list[str]:
    """Every mount point visible to this process, in mount order."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        return [_unescape(line.split(" ")[4]) for line in fh if line.strip()]
