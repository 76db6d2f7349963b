"""Placing config.files at their guest paths for one process, without touching the host's files.

Runs inside the launcher, before exec. The process gets a private mount namespace; nothing done
here is visible to the host or to other machines.

How a file gets to `guest_path`:

* **The path exists** (a file, or anything that is not a directory): a file with the new content
  is bind-mounted over it. The host file is never opened for writing.
* **The path does not exist**: the nearest existing ancestor directory is covered with an overlayfs
  whose upper layer is private to this process; missing directories and the file are created
  through the overlay, so they exist only in the upper layer. Mounts that were below that
  directory (e.g. a container's /etc/resolv.conf) are bound back on top of the overlay.
* **The nearest existing ancestor is "/"** (e.g. /hello.txt or /newdir/x): refused with an error.
  An overlay on / would hide every mount below it (/proc, /dev, /sys, ...), and re-binding all of
  them is fragile; a path in an existing directory covers real uses.

All scratch data (file contents, overlay upper layers) lives in a tmpfs mounted on `stage_dir`
inside the namespace only; it is addressed through /proc/self/fd/N so it stays reachable even
when an overlay later covers `stage_dir` itself, and it is detached before the program starts.

As a last safety net, a file or directory is only ever created in a directory whose device is
one of our overlays; anything else is an error, never a write to the host.

Volumes (`bind_volumes`, run before the files are placed) are directories on the host bound at
their mount path in the same private namespace:

* **The path is an existing directory**: the volume is bound over it.
* **It is missing below an existing directory other than "/"**: that directory is covered with a
  private overlay (as for files), the missing directories are made in it, and the volume is
  bound there.
* **It is a new top-level directory** (the usual `/data`): the process gets a new root, a private
  tmpfs holding a recursive bind of every entry of the real "/" (symlinks copied as symlinks),
  where the new directory is made; the process then chroots into it. Nothing is created on the
  host but the empty mount-point directory in the machine's workdir.
"""

from __future__ import annotations

import contextlib
import os
import posixpath

from jobrunner.local.process import mounts as proc_mounts

__all__ = [
    "DEFAULT_FILE_MODE",
    "ROOT_DIR_NAME",
    "STAGE_DIR_NAME",
    "FileToPlace",
    "PlacementError",
    "VolumeToMount",
    "bind_volumes",
    "place_files",
]

#: Name of the (empty, host-side) directory in the machine's workdir that the tmpfs is mounted on.
STAGE_DIR_NAME = ".jobrunner-files"
#: Name of the (empty, host-side) directory in the machine's workdir that a new root is built on.
ROOT_DIR_NAME = ".jobrunner-root"
DEFAULT_FILE_MODE = 0o644
_NEW_DIR_MODE = 0o755


class PlacementError(Exception):
    """A file could not be placed; the message names the guest path and the reason."""

    def __init__(self, guest_path: str, reason: str) -> None:
        super().__init__(f"cannot place file at {guest_path!r}: {reason}")
        self.guest_path = guest_path
        self.reason = reason


# Plain classes rather than dataclasses: importing dataclasses (and with it inspect) would add
# milliseconds to every machine start with files.
class FileToPlace:
    """One file for the launcher: where the process must see it, its bytes and its mode."""

    __slots__ = ("content", "guest_path", "mode")

    def __init__(self, guest_path: str, content: bytes, mode: int = DEFAULT_FILE_MODE) -> None:
        self.guest_path = guest_path
        self.content = content
        self.mode = mode


class _Plan:
    __slots__ = ("file", "overlay_on", "path")

    def __init__(self, file: FileToPlace, path: str, overlay_on: str | None) -> None:
        self.file = file
        self.path = path  # normalised guest path
        self.overlay_on = overlay_on  # real path of the directory to overlay; None: bind over it


def _normalise(guest_path: str) -> str:
    if not guest_path.startswith("/"):
        raise PlacementError(guest_path, "guest_path must be an absolute path (start with '/')")
    if "\0" in guest_path:
        raise PlacementError(guest_path, "guest_path contains a NUL byte")
    path = posixpath.normpath(guest_path)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if path == "/":
        raise PlacementError(guest_path, "guest_path must name a file, not '/'")
    return path


def _plan_one(file: FileToPlace) -> _Plan:
    path = _normalise(file.guest_path)
    if os.path.isdir(path):
        raise PlacementError(file.guest_path, "a directory exists at that path")
    if os.path.exists(path):
        return _Plan(file, path, None)
    if os.path.lexists(path) and not os.path.islink(path):
        raise PlacementError(file.guest_path, "the path exists but cannot be inspected")
    ancestor = posixpath.dirname(path)
    while not os.path.isdir(ancestor):
        if os.path.lexists(ancestor):
            raise PlacementError(file.guest_path, f"{ancestor!r} exists and is not a directory")
        ancestor = posixpath.dirname(ancestor)
    if os.path.realpath(ancestor) == "/":
        missing = path.split("/")[1]
        what = "files" if posixpath.dirname(path) == "/" else f"directories such as '/{missing}'"
        raise PlacementError(
            file.guest_path,
            f"the local backend cannot create new top-level {what} (that needs an overlay on '/', "
            "which would hide every other mount); use a path inside an existing directory "
            "such as /etc, /opt or /srv",
        )
    return _Plan(file, path, os.path.realpath(ancestor))


def _escape_overlay_path(path: str) -> str:
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


class _Stage:
    """The private tmpfs holding file contents and overlay layers, reached through an fd."""

    def __init__(self, stage_dir: str) -> None:
        self.mount_point = os.path.realpath(stage_dir)
        os.makedirs(self.mount_point, mode=0o700, exist_ok=True)
        proc_mounts.mount("tmpfs", self.mount_point, "tmpfs", 0, "mode=0700")
        self._fd = os.open(self.mount_point, os.O_RDONLY | os.O_DIRECTORY)
        self.root = f"/proc/self/fd/{self._fd}"
        self._count = 0

    def new_dir(self, prefix: str) -> str:
        self._count += 1
        path = f"{self.root}/{prefix}{self._count}"
        os.mkdir(path, 0o700)
        return path

    def new_file(self, content: bytes, mode: int) -> str:
        self._count += 1
        path = f"{self.root}/file{self._count}"
        _write_new(path, content, mode)
        return path

    def detach(self) -> None:
        """Detach the tmpfs (binds and overlays made from it keep working) and forget it."""
        try:
            proc_mounts.umount_detach(self.root)
        except OSError:
            # If this fails too, an overlay covers the stage: unreachable for the program anyway.
            with contextlib.suppress(OSError):
                proc_mounts.umount_detach(self.mount_point)
        os.close(self._fd)
        with contextlib.suppress(OSError):
            os.rmdir(self.mount_point)  # the empty host directory is not needed any more


def _write_new(path: str, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _submounts_to_keep(target: str, stage: _Stage) -> list[str]:
    """Mount points strictly below `target` (outermost only), except our own stage."""
    prefix = target.rstrip("/") + "/"
    own = stage.mount_point.rstrip("/") + "/"
    below = {
        point
        for point in proc_mounts.mount_points()
        if point.startswith(prefix) and not (point + "/").startswith(own)
    }
    return sorted(p for p in below if not any(p.startswith(o + "/") for o in below if o != p))


def _mount_overlay(target: str, stage: _Stage) -> int:
    """Cover `target` with an overlay whose upper layer is in the stage; returns its st_dev."""
    keep = _submounts_to_keep(target, stage)
    saved = ""
    if keep:
        saved = stage.new_dir("saved")
        proc_mounts.mount(target, saved, None, proc_mounts.MS_BIND | proc_mounts.MS_REC, None)
    upper, work = stage.new_dir("upper"), stage.new_dir("work")
    options = f"lowerdir={_escape_overlay_path(target)},upperdir={upper},workdir={work}"
    proc_mounts.mount("overlay", target, "overlay", 0, options)
    for point in keep:
        relative = point[len(target) :].lstrip("/")
        proc_mounts.mount(
            f"{saved}/{relative}", point, None, proc_mounts.MS_BIND | proc_mounts.MS_REC, None
        )
    return os.stat(target).st_dev


def _create_in_overlay(plan: _Plan, overlay_devs: set[int]) -> None:
    """Create missing directories and the file, only ever inside one of our overlays."""
    missing: list[str] = []
    parent = posixpath.dirname(plan.path)
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = posixpath.dirname(parent)
    for directory in [*reversed(missing), plan.path]:
        container = posixpath.dirname(directory)
        if os.stat(container).st_dev not in overlay_devs:
            raise PlacementError(
                plan.file.guest_path, f"{container!r} is not covered by the private overlay"
            )
        if directory != plan.path:
            os.mkdir(directory, _NEW_DIR_MODE)
    if os.path.islink(plan.path):
        os.unlink(plan.path)  # a dangling link: replaced inside the overlay only
    _write_new(plan.path, plan.file.content, plan.file.mode)


def _plan_all(files: list[FileToPlace]) -> list[_Plan]:
    by_path: dict[str, _Plan] = {}
    for file in files:
        plan = _plan_one(file)
        by_path[plan.path] = plan  # the same path twice: the last one wins
    return list(by_path.values())


_private_namespace = False


def _enter_private_namespace(guest_path: str, what: str) -> None:
    """unshare + make-rprivate, once per process (files and volumes share the namespace)."""
    global _private_namespace
    if _private_namespace:
        return
    try:
        proc_mounts.unshare_mount_namespace()
        proc_mounts.make_rprivate()
    except (OSError, AttributeError) as exc:
        raise PlacementError(
            guest_path,
            f"a private mount namespace is unavailable ({exc}); the local backend needs to run "
            f"as root on Linux to {what}",
        ) from exc
    _private_namespace = True


def place_files(files: list[FileToPlace], stage_dir: str) -> None:
    """Enter a private mount namespace and make every file visible at its guest path.

    Raises PlacementError (naming the guest path) when a file cannot be placed or when mount
    namespaces / overlayfs are unavailable (not root, not Linux, a restricted container).
    Call only in a single-threaded process that is about to exec.
    """
    if not files:
        return
    plans = _plan_all(files)
    first = plans[0].file.guest_path
    _enter_private_namespace(first, "place files")
    try:
        stage = _Stage(stage_dir)
    except OSError as exc:
        raise PlacementError(first, f"cannot create the private scratch tmpfs ({exc})") from exc
    try:
        _place(plans, stage)
    finally:
        stage.detach()


def _place(plans: list[_Plan], stage: _Stage) -> None:
    overlay_devs: set[int] = set()
    targets = sorted({p.overlay_on for p in plans if p.overlay_on}, key=lambda t: t.count("/"))
    for target in targets:
        if os.stat(target).st_dev in overlay_devs:
            continue  # already inside one of our overlays
        try:
            overlay_devs.add(_mount_overlay(target, stage))
        except OSError as exc:
            culprit = next(p for p in plans if p.overlay_on == target)
            raise PlacementError(
                culprit.file.guest_path, f"cannot overlay {target!r} ({exc})"
            ) from exc
    for plan in plans:
        try:
            if plan.overlay_on is None:
                source = stage.new_file(plan.file.content, plan.file.mode)
                proc_mounts.mount(source, plan.path, None, proc_mounts.MS_BIND, None)
            else:
                _create_in_overlay(plan, overlay_devs)
        except OSError as exc:
            raise PlacementError(plan.file.guest_path, str(exc)) from exc


class VolumeToMount:
    """A volume for the launcher: its directory on the host and the path the process sees."""

    __slots__ = ("path", "source")

    def __init__(self, source: str, path: str) -> None:
        self.source = source
        self.path = path


def _nearest_directory(path: str) -> str:
    ancestor = posixpath.dirname(path)
    while not os.path.isdir(ancestor):
        if os.path.lexists(ancestor):
            raise PlacementError(path, f"{ancestor!r} exists and is not a directory")
        ancestor = posixpath.dirname(ancestor)
    return ancestor


def bind_volumes(volumes: list[VolumeToMount], root_dir: str, stage_dir: str) -> None:
    """Enter the private mount namespace and bind each volume's directory at its path.

    `root_dir` (in the machine's workdir) is where a new root is built when a path needs a new
    top-level directory; the process is then chrooted into it (its cwd is left at "/": the caller
    changes to the workdir afterwards, which the new root reaches through its bind of the real
    top-level directory). Raises PlacementError naming the path. Call before `place_files`.
    """
    if not volumes:
        return
    wanted = sorted(volumes, key=lambda v: _normalise(v.path).count("/"))
    _enter_private_namespace(wanted[0].path, "mount volumes")
    for volume in wanted:
        if not os.path.isdir(volume.source):
            raise PlacementError(volume.path, f"the volume's directory {volume.source!r} is gone")
    new_top = sorted(
        {
            _normalise(v.path).split("/")[1]
            for v in wanted
            if not os.path.lexists(_normalise(v.path)) and _nearest_directory(v.path) == "/"
        }
    )
    if new_top:
        try:
            _new_root(root_dir, new_top)
        except OSError as exc:
            raise PlacementError(wanted[0].path, f"cannot build a private root ({exc})") from exc
    stage: _Stage | None = None
    try:
        for volume in wanted:
            path = _normalise(volume.path)
            if os.path.lexists(path) and not os.path.isdir(path):
                raise PlacementError(volume.path, "the path exists and is not a directory")
            if not os.path.isdir(path):
                if stage is None:
                    stage = _Stage(stage_dir)
                _make_dirs_in_overlay(path, stage)
            try:
                proc_mounts.mount(
                    volume.source, path, None, proc_mounts.MS_BIND | proc_mounts.MS_REC, None
                )
            except OSError as exc:
                raise PlacementError(volume.path, f"cannot bind the volume there ({exc})") from exc
    finally:
        if stage is not None:
            stage.detach()


def _make_dirs_in_overlay(path: str, stage: _Stage) -> None:
    """Make `path` (a missing directory) inside a private overlay of its nearest ancestor."""
    ancestor = os.path.realpath(_nearest_directory(path))
    try:
        device = _mount_overlay(ancestor, stage)
        missing = []
        parent = path
        while not os.path.isdir(parent):
            missing.append(parent)
            parent = posixpath.dirname(parent)
        for directory in reversed(missing):
            if os.stat(posixpath.dirname(directory)).st_dev != device:
                raise PlacementError(path, f"{directory!r} is not covered by the private overlay")
            os.mkdir(directory, _NEW_DIR_MODE)
    except OSError as exc:
        raise PlacementError(path, f"cannot make the mount point ({exc})") from exc


def _new_root(root_dir: str, new_top: list[str]) -> None:
    """Build a root with every entry of "/" plus the `new_top` directories, and chroot into it."""
    root = os.path.realpath(root_dir)
    os.makedirs(root, mode=0o700, exist_ok=True)
    proc_mounts.mount("tmpfs", root, "tmpfs", 0, "mode=0755")
    for name in sorted(os.listdir("/")):
        source, target = "/" + name, f"{root}/{name}"
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        elif os.path.isdir(source):
            os.mkdir(target, 0o755)
            proc_mounts.mount(source, target, None, proc_mounts.MS_BIND | proc_mounts.MS_REC, None)
        elif os.path.isfile(source):
            _write_new(target, b"", 0o644)
            with contextlib.suppress(OSError):
                proc_mounts.mount(source, target, None, proc_mounts.MS_BIND, None)
    for name in new_top:
        os.mkdir(f"{root}/{name}", _NEW_DIR_MODE)
    os.chroot(root)
    os.chdir("/")
    # The bind of root_dir's top-level directory carried a copy of the new root along: drop it,
    # so the process does not see its root again inside its workdir.
    with contextlib.suppress(OSError):
        proc_mounts.umount_detach(root)
