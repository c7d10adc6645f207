"""The copy-on-write root of a sandbox: over an image's layers, or over a template (a skeleton
of the root's directories, generated once per node, and the template's /usr, the host's for
the host template), and over the snapshots it started from.

Under the sandbox's directory:

    lower/      the node's unpacked image layers, idmapped into the sandbox's uids (idmap.py)
    snapshot-N/ the snapshot it started from and that one's parents, idmapped the same way
    layers/     neutral names for the overlays' options: l0, l1... -> image layers, s0, s1...
                and w0, w1... -> snapshots' roots and workspaces, and root-upper, root-work,
                ws-upper, ws-work, empty -> the writable dirs
    root/       the root overlay: the snapshots' roots over the image's layers, writable
                layer on the sandbox's own file system; bwrap binds it at /
    ws/         the /workspace overlay: the snapshots' workspaces (or nothing) below
    usr-lower/  a template's /usr, idmapped (a template's sandboxes only)
    usr/        the /usr overlay: the snapshots' usr layers over the template's /usr

The writable layers live on the sandbox's disk (its ext4 image when it has a disk limit, so
the limit covers everything it writes), else in its directory on the data dir's file system.
Overlays are mounted from inside layers/ with relative names, so mountinfo shows no host path
(mounts.py). Nothing in the writable layers is read or followed by the node: they are the
sandbox's.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from corral.runtime.idmap import mount_idmapped
from corral.runtime.mounts import mount_overlay, mounted_under, unmount

ROOT_UPPER, ROOT_WORK, WS_UPPER, WS_WORK = "root-upper", "root-work", "ws-upper", "ws-work"
USR_UPPER, USR_WORK = "usr-upper", "usr-work"
# The directories of a template's root skeleton besides etc/ (made by build_skeleton).
SKELETON_DIRS = ("home", "mnt", "opt", "srv", "tmp", "usr", "var", "workspace")
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

    @property
    def usr(self) -> Path:
        return self.directory / "usr"

    @property
    def usr_upper(self) -> Path:
        return self.writable / USR_UPPER


def _link(links: Path, name: str, to: Path) -> None:
    path = links / name
    if os.path.lexists(path):
        path.unlink()
    path.symlink_to(to)


def prepare_writable(
    layout: RootLayout, root_uid: int, user_uid: int, *, usr: bool = False
) -> bool:
    """The upper and work dirs, made on the first start; True if they were new. The root
    directory of each upper layer gives the merged directory its owner."""
    fresh = not layout.upper.exists()
    dirs = [
        (ROOT_UPPER, root_uid, 0o755), (ROOT_WORK, 0, 0o700),
        (WS_UPPER, user_uid, 0o755), (WS_WORK, 0, 0o700),
    ]  # fmt: skip
    if usr:
        dirs += [(USR_UPPER, root_uid, 0o755), (USR_WORK, 0, 0o700)]
    for name, owner, mode in dirs:
        path = layout.writable / name
        if not os.path.lexists(path):
            path.mkdir(mode=0o700)
            os.chown(path, owner, owner)
            path.chmod(mode)
    if fresh and usr:
        # A template's /usr is the host's: its /usr/local is the host's own, not shown.
        local = layout.usr_upper / "local"
        local.mkdir(mode=0o755)
        os.chown(local, root_uid, root_uid)
        os.setxattr(local, "trusted.overlay.opaque", b"y")
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
    usr: Path | None = None,
) -> None:
    """Mount the sandbox's root and workspace overlays (again after a restart). `layers` are
    the image's lower dirs under `layers_root`, top-most first; `snapshots` the directories
    (root/ and workspace/ in each) of the snapshot it starts from and its parents, newest
    first. `usr` is a template's /usr, for its own overlay (usr/ in the snapshots)."""
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
    for name in (ROOT_UPPER, ROOT_WORK, WS_UPPER, WS_WORK, USR_UPPER, USR_WORK):
        _link(links, name, layout.writable / name)
    for target in (layout.root, layout.workspace):
        target.mkdir(mode=0o755, exist_ok=True)
    if usr is not None:
        shown = directory / "usr-lower"
        shown.mkdir(mode=0o700, exist_ok=True)
        mount_idmapped(usr, shown, userns_fd)
        _link(links, "u", shown)
        usr_names = [f"t{i}" for i in range(len(snapshots))]
        for index in range(len(snapshots)):
            _link(links, f"t{index}", directory / f"snapshot-{index}" / "usr")
        layout.usr.mkdir(mode=0o755, exist_ok=True)
        mount_overlay(
            layout.usr,
            f"lowerdir={':'.join([*usr_names, 'u'])},upperdir={USR_UPPER},workdir={USR_WORK}",
            links,
        )
    mount_overlay(
        layout.root,
        f"lowerdir={':'.join(names)},upperdir={ROOT_UPPER},workdir={ROOT_WORK}",
        links,
    )
    ws_lower = ":".join(ws_names) or "empty"
    mount_overlay(
        layout.workspace, f"lowerdir={ws_lower},upperdir={WS_UPPER},workdir={WS_WORK}", links
    )


def unmount_root(layout: RootLayout) -> None:
    directory = layout.directory
    names = ["usr", "ws", "root", "lower", "usr-lower"]
    if directory.is_dir():
        names += sorted(p.name for p in directory.iterdir() if p.name.startswith("snapshot-"))
    for name in names:
        for target in mounted_under(directory / name):
            unmount(target)


def build_skeleton(
    target: Path, *, etc: Path | None, files: dict[str, str], links: dict[str, str]
) -> None:
    """A template's root without its /usr, as a lower layer: the usual directories, /bin and
    the rest as links into usr/, and etc/ (a copy of the template's `etc`, then `files`
    written and `links` made where the template has nothing of that name). Owned by uid 0:
    sandboxes see it as their root's."""
    target.mkdir(mode=0o755)
    for name in SKELETON_DIRS:
        (target / name).mkdir(mode=0o755)
    (target / "root").mkdir(mode=0o700)
    (target / "tmp").chmod(0o1777)
    (target / "var" / "tmp").symlink_to("../tmp")
    for name in ("bin", "lib", "lib64", "sbin"):
        (target / name).symlink_to(f"usr/{name}")
    if etc is not None and etc.is_dir():
        subprocess.run(["cp", "-a", "--", str(etc), str(target / "etc")], check=True)
    else:
        (target / "etc").mkdir(mode=0o755)
    for name, text in files.items():
        path = target / "etc" / name
        if os.path.lexists(path):
            path.unlink()
        path.write_text(text)
        path.chmod(0o644)
    for name, to in links.items():
        if not os.path.lexists(target / "etc" / name):
            (target / "etc" / name).symlink_to(to)


NODE_DIR = ".corral"  # the node's own mount points: made afresh before every start


def secure_mount_points(
    upper: Path, *, dirs: list[str], files: list[str], node_tree: dict[str, bool], owner: int
) -> None:
    """Before a start, make the root's writable layer safe for bwrap's mounts, which follow
    symlinks in their destinations: each directory of `dirs` (absolute paths) and each parent
    of `files` becomes a real directory in `upper` (a symlink, file or whiteout there is
    removed; a directory in the upper layer hides whatever a lower layer has at that name),
    each file of `files` an empty regular file, and `/.corral` is made again, owned by host
    root (which the sandbox cannot change), opaque over the lower layers, holding the node's
    mount points (`node_tree`: relative path -> is a directory). Never follows a link; runs
    while the sandbox is stopped."""
    root_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _remove_entry(root_fd, NODE_DIR)
        os.mkdir(NODE_DIR, 0o755, dir_fd=root_fd)
        os.setxattr(f"/proc/self/fd/{root_fd}/{NODE_DIR}", "trusted.overlay.opaque", b"y")
        for relative, is_dir in sorted(node_tree.items()):
            parent = _real_dirs(root_fd, [NODE_DIR, *Path(relative).parts[:-1]], 0)
            try:
                if is_dir:
                    os.mkdir(Path(relative).name, 0o755, dir_fd=parent)
                else:
                    os.close(os.open(Path(relative).name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_NOFOLLOW, 0o644, dir_fd=parent))  # fmt: skip
            finally:
                os.close(parent)
        for path in dirs:
            os.close(_real_dirs(root_fd, Path(path).parts[1:], owner))
        for path in files:
            parts = Path(path).parts[1:]
            parent = _real_dirs(root_fd, parts[:-1], owner)
            try:
                _remove_entry(parent, parts[-1])
                fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o644, dir_fd=parent)  # fmt: skip
                os.fchown(fd, owner, owner)
                os.close(fd)
            finally:
                os.close(parent)
    finally:
        os.close(root_fd)


def _real_dirs(root_fd: int, parts: list[str] | tuple[str, ...], owner: int) -> int:
    """A descriptor of `parts` under `root_fd`, each component made a real directory."""
    fd = os.dup(root_fd)
    for name in parts:
        try:
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:
            child = -1
        except OSError:  # a symlink, a file, a whiteout
            _remove_entry(fd, name)
            child = -1
        if child == -1:
            os.mkdir(name, 0o755, dir_fd=fd)
            os.chown(name, owner, owner, dir_fd=fd, follow_symlinks=False)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = child
    return fd


def _remove_entry(dir_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    # Through descriptors, never following a symlink (only directories are descended).
    shutil.rmtree(name, dir_fd=dir_fd)
