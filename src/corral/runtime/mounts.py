"""Mount sources that show a sandbox its files without showing it where they are on the host.

A sandbox reads /proc/self/mountinfo, whose fourth field is each mount's path within its source
file system: a bind of a host directory shows that directory's whole path (the data dir's, a
temp dir's name). A bind from the root of a file system of its own shows "/". So what sandboxes
are shown comes from such roots:

- a sandbox with a disk limit: its own ext4 image (namespaces.py);
- a sandbox without one: an overlay whose upper layer is the sandbox's directory;
- what all sandboxes share read-only (the tools, the supervisor, templates): one read-only
  overlay per directory for the whole node, made once.

Overlays list their layers in the mount's options, which mountinfo shows as given: they are
mounted from inside a directory of neutral names with relative paths ("lowerdir=layer2:empty"),
never with a host path. The kernel resolves those against the mounting thread's working
directory, which is the whole process's: so overlays are mounted by one thread that has a working
directory of its own (unshare(CLONE_FS)), with mount(2) itself. Through mount(8), which parses
the mount table first (and the table grows with every sandbox), an overlay took 3.9 ms on a
host with a near-empty table; in that thread it takes 1.0 ms.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

OVERLAY_SOURCE = "corral"  # the "device" mountinfo shows for these overlays


_LIBC = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
CLONE_FS = 0x200


def _own_working_directory() -> None:
    if _LIBC.unshare(CLONE_FS) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_FS): {os.strerror(errno)}")


# The thread that mounts overlays: its working directory is its own, not the process's.
_MOUNTER = ThreadPoolExecutor(
    1, thread_name_prefix="corral-overlay-mount", initializer=_own_working_directory
)


def mount_overlay(target: Path, options: str, cwd: Path) -> None:
    """Mount an overlay from inside `cwd`, its layers named relative to it (no host path in
    mountinfo). Raises OSError if the kernel refuses it."""
    _MOUNTER.submit(_mount_overlay_here, os.fsencode(target), options.encode(), cwd).result()


def _mount_overlay_here(target: bytes, options: bytes, cwd: Path) -> None:
    os.chdir(cwd)
    try:
        if _LIBC.mount(OVERLAY_SOURCE.encode(), target, b"overlay", 0, options) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"overlay mount refused: {os.strerror(errno)}")
    finally:
        os.chdir("/")  # holds no directory of a sandbox's busy


def unmount(target: Path | str) -> None:
    """Detach the mount at `target`, lazily: sandboxes still running keep what they bound
    from it (a loop device goes once its last user does). Nothing mounted there: nothing."""
    if _LIBC.umount2(os.fsencode(target), MNT_DETACH) != 0:
        errno = ctypes.get_errno()
        if errno not in (22, 2):  # EINVAL: not a mount point; ENOENT: no such path
            log.warning("could not unmount %s: %s", target, os.strerror(errno))


def mounted_under(prefix: Path) -> list[Path]:
    """Mount points at or below `prefix`, deepest first."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target == str(prefix) or target.startswith(str(prefix) + "/"):
            found.append(Path(target))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


class SharedViews:
    """Read-only views of host directories for every sandbox of the node, one overlay each,
    mounted under `root` when first asked for and mounted again when the directory there is
    replaced (a template renamed into place). Without overlay support, the directories
    themselves are used, and mountinfo shows their paths."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layers = root / "layers"  # links to the sources, named layer<N>, and empty/
        self.available = False  # read-only views
        self.writable = False  # overlays with an upper layer on the data dir's file system
        self._views: dict[Path, tuple[tuple[int, int], Path]] = {}
        self._count = 0
        self._lock = threading.Lock()  # sandboxes start from worker threads

    def setup(self) -> None:
        """Clear what an earlier run left, and find what this host supports."""
        self.close()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for stale in self.root.iterdir():
            if stale.name != "layers":
                with contextlib.suppress(OSError):
                    stale.rmdir()
        if self.layers.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(self.layers)], check=False)
        (self.layers / "empty").mkdir(parents=True)
        self.layers.chmod(0o700)
        self.available = self._probe("ro,lowerdir=probe-files:empty")
        self.writable = self._probe("lowerdir=empty,upperdir=probe-files,workdir=probe-work")

    def _probe(self, options: str) -> bool:
        probe = self.root / "probe"
        probe.mkdir(exist_ok=True)
        for name in ("probe-files", "probe-work"):
            (self.layers / name).mkdir(exist_ok=True)
        try:
            mount_overlay(probe, options, self.layers)
        except OSError as exc:
            log.info("overlay %s: %s", options, exc)
            return False
        finally:
            unmount(probe)
            with contextlib.suppress(OSError):
                probe.rmdir()
        return True

    def view(self, source: Path) -> Path:
        """Where `source` is shown read-only, from the root of a file system of its own."""
        if not self.available:
            return source
        st = os.stat(source)
        identity = (st.st_dev, st.st_ino)
        with self._lock:
            known = self._views.get(source)
            if known is not None and known[0] == identity:
                return known[1]
            self._count += 1
            layer = f"layer{self._count}"
            (self.layers / layer).symlink_to(source)
            target = self.root / layer
            target.mkdir(exist_ok=True)
            target.chmod(0o755)
            # Two lower layers: overlay refuses a single one without an upper layer.
            mount_overlay(target, f"ro,lowerdir={layer}:empty", self.layers)
            self._views[source] = (identity, target)
            if known is not None:
                unmount(known[1])
            return target

    def close(self) -> None:
        with self._lock:
            self._views.clear()
        if self.root.exists():
            for target in mounted_under(self.root):
                unmount(target)


def mount_private_overlay(directory: Path, target: Path) -> None:
    """A writable file system at `target` whose root is `directory`/files (kept across
    restarts), for a sandbox without its own disk. The lower layer is empty, so files are only
    ever in the upper one: writes, renames and deletions act on `directory`/files directly, with
    no copy-up and no whiteouts."""
    for name in ("files", "lower", "work"):
        (directory / name).mkdir(exist_ok=True)
    target.mkdir(exist_ok=True)
    mount_overlay(target, "lowerdir=lower,upperdir=files,workdir=work", directory)
