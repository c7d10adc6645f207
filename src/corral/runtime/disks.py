"""Sandbox disks made ahead of time.

A sandbox with a disk limit has an ext4 image of its own, loop-mounted at its disk/
(namespaces.py). Making one (mkfs.ext4, a loop device, the mount) is most of a cold start's own
work: 40 to 100 ms and more on a loaded host. So the node keeps a few made and mounted, in the
background, and a start takes one: the image is renamed into the sandbox's directory and its
mount moved onto the sandbox's disk/ (MS_MOVE), well under a millisecond. A spare holds nothing
but an empty file system; which sandbox gets it is decided only when it is taken.

Spares are mounted below a directory that is a private mount of its own, so that the move works
whatever propagation the host gives the data dir. Their images are kept beside it on the data
dir's own mount (a rename cannot cross mounts). What an earlier run left is removed at start;
everything at close.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.runtime.mounts import mounted_under, unmount

log = logging.getLogger(__name__)

_LIBC = ctypes.CDLL(None, use_errno=True)
MS_BIND = 4096
MS_MOVE = 8192
MS_PRIVATE = 1 << 18
KEEP = 2  # spares of each size in use; a start takes one, the filler makes the next
SIZES = 2  # distinct sizes kept (the default disk, and one other asked for lately)
# Below the requests a node serves: what makes spares runs niced, and only once no start has
# run for QUIET seconds (its mounts would contend with a start's for the same kernel locks).
NICE = ["nice", "-n", "10"]
QUIET = 0.05


def mkfs_command(image: Path, disk_mb: int, owner: int) -> list[str]:
    """mkfs.ext4 of a sandbox's disk (sparse; no journal, a resize inode or reserved blocks)."""
    return [
        "mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal,^resize_inode",
        # One inode per 64 KiB (most of disk_mb stays usable), but never fewer than a root's
        # layers and mount points need on the smallest disk.
        "-N", str(max(1024, disk_mb * 16)),
        "-E", f"root_owner={owner}:{owner}", str(image),
    ]  # fmt: skip


# mount(8) picks a free loop device and then binds it: two loop mounts at once on one host (a
# node's start and its spare-disk thread, or another node) can pick the same device, and the
# loser fails with one of these. The device is taken by then, so trying again picks another.
_LOOP_RACE = (b"already mounted or mount point busy", b"failed to setup loop device")
LOOP_MOUNT_TRIES = 3


def loop_mount(image: Path, target: Path, *, nice: bool = False) -> None:
    argv = [*(NICE if nice else []), "mount", "-o", "loop,nosuid,nodev", str(image), str(target)]
    for attempt in range(1, LOOP_MOUNT_TRIES + 1):
        try:
            subprocess.run(argv, check=True, capture_output=True)
            return
        except subprocess.CalledProcessError as exc:
            lost_race = any(text in (exc.stderr or b"") for text in _LOOP_RACE)
            if attempt == LOOP_MOUNT_TRIES or not lost_race or os.path.ismount(target):
                raise
            time.sleep(0.01 * attempt)


@dataclass
class _Spare:
    size_mb: int
    image: Path
    mount: Path


class SpareDisks:
    """Spare sandbox disks of the sizes recently asked for, made by a background thread."""

    def __init__(self, runtime_dir: Path, *, keep: int = KEEP) -> None:
        self.images = runtime_dir / "disk-images"
        self.mounts = runtime_dir / "disks"
        self.keep = keep
        self._ready: list[_Spare] = []
        self._sizes: list[int] = []  # most recently asked for last
        self._count = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._private = False
        self._starts = 0  # sandbox starts under way
        self._last_start = 0.0  # when the last one ended (monotonic)

    def setup(self) -> None:
        """Remove an earlier run's spares and start the filler (idle until a size is asked)."""
        self._remove_all()
        for d in (self.images, self.mounts):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        path = os.fsencode(self.mounts)
        if _LIBC.mount(path, path, None, MS_BIND, None) == 0:
            self._private = _LIBC.mount(None, path, None, MS_PRIVATE, None) == 0
        self._thread = threading.Thread(target=self._fill, name="spare-disks", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Around a sandbox's start: no spare is made meanwhile."""
        with self._cond:
            self._starts += 1
        try:
            yield
        finally:
            with self._cond:
                self._starts -= 1
                self._last_start = time.monotonic()
                self._cond.notify()

    def take(self, size_mb: int, image: Path, target: Path) -> bool:
        """Put a spare of `size_mb` at `image`, mounted at `target` (an empty directory);
        False if none is ready (the caller makes the disk itself). Asks for the next."""
        with self._cond:
            if self._closed:
                return False
            if size_mb in self._sizes:
                self._sizes.remove(size_mb)
            self._sizes.append(size_mb)
            del self._sizes[:-SIZES]
            spare = next((s for s in self._ready if s.size_mb == size_mb), None)
            if spare is not None:
                self._ready.remove(spare)
            self._cond.notify()
        if spare is None:
            return False
        try:
            os.rename(spare.image, image)
        except OSError as exc:  # another file system (EXDEV): make disks in place
            log.warning("a spare disk cannot be moved to %s: %s", image, exc)
            self._discard(spare)
            return False
        if _move(spare.mount, target):
            with contextlib.suppress(OSError):
                spare.mount.rmdir()
            return True
        # The host's propagation refused the move: mount the (already made) image in place.
        unmount(spare.mount)
        with contextlib.suppress(OSError):
            spare.mount.rmdir()
        loop_mount(image, target)
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._remove_all()

    # --- the filler ---

    def _wanted(self) -> int | None:
        for size in reversed(self._sizes):
            if sum(1 for s in self._ready if s.size_mb == size) < self.keep:
                return size
        return None

    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._wanted() is None:
                        self._cond.wait()
                        continue
                    calm = self._last_start + QUIET - time.monotonic()
                    if self._starts == 0 and calm <= 0:
                        break
                    self._cond.wait(None if self._starts else calm)
                if self._closed:
                    return
                size = self._wanted()
                self._count += 1
                name = f"d{self._count}"
            assert size is not None
            spare = _Spare(size, self.images / f"{name}.img", self.mounts / name)
            try:
                self._make(spare)
            except (OSError, subprocess.CalledProcessError) as exc:
                detail = getattr(exc, "stderr", b"") or b""
                log.warning("could not make a spare disk: %s %s", exc, detail.decode()[-300:])
                self._discard(spare)
                with self._cond:  # no retry in a loop: the next take asks again
                    if size in self._sizes:
                        self._sizes.remove(size)
                continue
            with self._cond:
                if self._closed:
                    self._discard(spare)
                    return
                self._ready.append(spare)

    @staticmethod
    def _make(spare: _Spare) -> None:
        """The image is named *.img once it is made and mounted (before: *.img.new)."""
        partial = spare.image.with_name(spare.image.name + ".new")
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.truncate(spare.size_mb * 1024 * 1024)
        # Owned by host root until taken; the start gives its root to the sandbox's uid.
        subprocess.run([*NICE, *mkfs_command(partial, spare.size_mb, 0)], check=True,
                       capture_output=True)  # fmt: skip
        spare.mount.mkdir(mode=0o700)
        loop_mount(partial, spare.mount, nice=True)
        lost = spare.mount / "lost+found"
        if lost.is_dir():
            lost.rmdir()
        os.rename(partial, spare.image)

    def _discard(self, spare: _Spare) -> None:
        unmount(spare.mount)
        with contextlib.suppress(OSError):
            spare.mount.rmdir()
        for path in (spare.image, spare.image.with_name(spare.image.name + ".new")):
            with contextlib.suppress(OSError):
                path.unlink()

    def _remove_all(self) -> None:
        with self._cond:
            spares, self._ready = self._ready, []
        for spare in spares:
            self._discard(spare)
        if self.mounts.exists():
            for target in mounted_under(self.mounts):  # the spares, then the private bind
                unmount(target)
            for stale in self.mounts.iterdir():
                with contextlib.suppress(OSError):
                    stale.rmdir()
        if self.images.exists():
            shutil.rmtree(self.images, ignore_errors=True)


def _move(source: Path, target: Path) -> bool:
    if _LIBC.mount(os.fsencode(source), os.fsencode(target), None, MS_MOVE, None) == 0:
        return True
    log.info("moving a spare disk's mount: %s", os.strerror(ctypes.get_errno()))
    return False
