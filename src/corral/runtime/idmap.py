"""Idmapped mounts: a directory shown with its files' owners shifted into a sandbox's block of
host uids (uids.py), without copying or chowning anything.

An image's layers (and snapshots) are stored once per node with the uids inside (0 for root, 42
for `_apt`, ...); each sandbox sees them through an idmapped mount made with a user namespace of
its own mapping, so that its root owns the files its image's root owns. Needs Linux 5.19 or
later for overlayfs over idmapped layers; the new mount API has no wrapper in Python's os
module, hence the raw system calls.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
from pathlib import Path

_LIBC = ctypes.CDLL(None, use_errno=True)
# x86_64 and aarch64 share these numbers (the new mount API came after the unified table).
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x100000


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def supported() -> bool:
    return platform.machine() in ("x86_64", "aarch64")


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def user_namespace(uid_map: str) -> int:
    """A descriptor of a new user namespace with this uid and gid map, owned by no process
    (the one that made it has exited)."""
    holder = subprocess.Popen(
        ["unshare", "--user", "--", "sh", "-c", "echo ready; read _"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        if holder.stdout.readline() != b"ready\n":
            raise OSError(0, "could not make a user namespace")
        Path(f"/proc/{holder.pid}/uid_map").write_text(uid_map)
        Path(f"/proc/{holder.pid}/setgroups").write_text("deny")
        Path(f"/proc/{holder.pid}/gid_map").write_text(uid_map)
        return os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.kill()
        holder.wait()


def mount_idmapped(source: Path, target: Path, userns_fd: int, *, read_only: bool = True) -> None:
    """Mount `source` (a directory tree of one file system) at `target`, its owners mapped
    through the user namespace `userns_fd`; nosuid and nodev, read-only unless asked."""
    tree = _check(
        _LIBC.syscall(
            SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
        ),
        "open_tree",
    )
    try:
        flags = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
        if read_only:
            flags |= MOUNT_ATTR_RDONLY
        attr = _MountAttr(flags, 0, 0, userns_fd)
        _check(
            _LIBC.syscall(
                SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)
            ),
            "mount_setattr",
        )
        _check(
            _LIBC.syscall(
                SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH
            ),
            "move_mount",
        )
    finally:
        os.close(tree)
