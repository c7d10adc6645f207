"""The copy-on-write root of a sandbox started from an image (or a snapshot of one).

Under the sandbox's directory:

    lower/      the node's unpacked image layers, idmapped into the sandbox's uids (idmap.py)
    snapshot-N/ the snapshot it started from and that one's parents, idmapped the same way
    layers/     neutral names for the overlays' options: l0, l1... -> image layers, s0, s1...
                and w0, w1... -> snapshots' roots and workspaces, and root-upper, root-work,
                ws-upper, ws-work, empty -> the writable dirs
    root/       the root overlay: the snapshots' roots over the image's layers, writable
                layer on the sandbox's own file system; bwrap binds it at /
    ws/         the /workspace overlay: the snapshots' workspaces (or nothing) below

The writable layers live on the sandbox's disk (its ext4 image when it has a disk limit, so
the limit covers everything it writes), else in its directory on the data dir's file system.
Overlays are mounted from inside layers/ with relative names, so mountinfo shows no host path
(mounts.py). Nothing in the writable layers is read or followed by the node: they are the
sandbox's.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from corral.runtime.idmap import mount_idmapped
from corral.runtime.mounts import OVERLAY_SOURCE, mounted_under, unmount

ROOT_UPPER, ROOT_WORK, WS_UPPER, WS_WORK = "root-upper", "root-work", "ws-upper", "ws-work"
# Written into a new root's /etc (upper layer) once, before the sandbox first runs: the image's
# own are about the machine it was built on.
ETC_FILES = {
    "hostname": "sandbox\n",
    "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "resolv.conf": "",
}


@dataclass(frozen=True)
class RootLayout:
    directory: Path  # the sandbox's directory
    writable: Path  # where its upper and work dirs are (its disk, or directory/cow)

    @property
    def root(self) -> Path:
        return self.directory / "root"

    @property
    def workspace(self) -> Path:
        return self.directory / "ws"

    @property
    def upper(self) -> Path:
        """The root's writable layer: what a snapshot captures, with the workspace's."""
        return self.writable / ROOT_UPPER

    @property
    def workspace_upper(self) -> Path:
        return self.writable / WS_UPPER


def _mount_overlay(target: Path, options: str, cwd: Path) -> None:
    subprocess.run(
        ["mount", "-t", "overlay", OVERLAY_SOURCE, "-o", options, str(target)],
        check=True, capture_output=True, cwd=cwd,
    )  # fmt: skip


def _link(links: Path, name: str, to: Path) -> None:
    path = links / name
    if os.path.lexists(path):
        path.unlink()
    path.symlink_to(to)


def prepare_writable(layout: RootLayout, root_uid: int, user_uid: int) -> bool:
    """The upper and work dirs, made on the first start; True if they were new. The root
    directory of each upper layer gives the merged directory its owner."""
    fresh = not layout.upper.exists()
    for name, owner, mode in (
        (ROOT_UPPER, root_uid, 0o755), (ROOT_WORK, 0, 0o700),
        (WS_UPPER, user_uid, 0o755), (WS_WORK, 0, 0o700),
    ):  # fmt: skip
        path = layout.writable / name
        if not os.path.lexists(path):
            path.mkdir(mode=0o700)
            os.chown(path, owner, owner)
            path.chmod(mode)
    if fresh:
        etc = layout.upper / "etc"
        etc.mkdir()
        os.chown(etc, root_uid, root_uid)
        etc.chmod(0o755)
        for name, text in ETC_FILES.items():
            fd = os.open(etc / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with open(fd, "w") as f:
                f.write(text)
            os.chown(etc / name, root_uid, root_uid)
    return fresh


def mount_root(
    layout: RootLayout,
    *,
    layers_root: Path,
    layers: list[Path],
    snapshots: list[Path],
    userns_fd: int,
) -> None:
    """Mount the sandbox's root and workspace overlays (again after a restart). `layers` are
    the image's lower dirs under `layers_root`, top-most first; `snapshots` the directories
    (root/ and workspace/ in each) of the snapshot it starts from and its parents, newest
    first."""
    unmount_root(layout)
    directory = layout.directory
    links = directory / "layers"
    links.mkdir(mode=0o700, exist_ok=True)
    lower = directory / "lower"
    lower.mkdir(mode=0o700, exist_ok=True)
    mount_idmapped(layers_root, lower, userns_fd)
    names, ws_names = [], []
    for index, snapshot in enumerate(snapshots):
        shown = directory / f"snapshot-{index}"
        shown.mkdir(mode=0o700, exist_ok=True)
        mount_idmapped(snapshot, shown, userns_fd)
        _link(links, f"s{index}", shown / "root")
        _link(links, f"w{index}", shown / "workspace")
        names.append(f"s{index}")
        ws_names.append(f"w{index}")
    for index, layer in enumerate(layers):
        _link(links, f"l{index}", lower / layer.relative_to(layers_root))
        names.append(f"l{index}")
    (links / "empty").mkdir(exist_ok=True)
    for name in (ROOT_UPPER, ROOT_WORK, WS_UPPER, WS_WORK):
        _link(links, name, layout.writable / name)
    for target in (layout.root, layout.workspace):
        target.mkdir(mode=0o755, exist_ok=True)
    _mount_overlay(
        layout.root,
        f"lowerdir={':'.join(names)},upperdir={ROOT_UPPER},workdir={ROOT_WORK}",
        links,
    )
    ws_lower = ":".join(ws_names) or "empty"
    _mount_overlay(
        layout.workspace, f"lowerdir={ws_lower},upperdir={WS_UPPER},workdir={WS_WORK}", links
    )


def unmount_root(layout: RootLayout) -> None:
    directory = layout.directory
    names = ["ws", "root", "lower"]
    if directory.is_dir():
        names += sorted(p.name for p in directory.iterdir() if p.name.startswith("snapshot-"))
    for name in names:
        for target in mounted_under(directory / name):
            unmount(target)
