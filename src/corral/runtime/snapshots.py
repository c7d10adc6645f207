"""Snapshots of sandboxes from images: their writable layers, kept on the node as overlay lower
layers that any number of sandboxes start from without copying them.

A snapshot is a directory under the node's snapshots/:

    root/           the root's writable layer (overlay upper format: whiteouts, opaque dirs)
    workspace/      the workspace's writable layer
    snapshot.json   {"image", "template", "parent", "bytes"}
    deleted         present once removed while other snapshots still build on it

A sandbox on a template (no image) has no overlay root: its snapshot holds copies of its own
directories (workspace/, etc/, usr-local/, root-home/, home/), and a sandbox started from it
gets copies of them (restore()).

A sandbox that started from a snapshot writes only its own layers, so its snapshot names the
one it came from as `parent` and holds only what changed since: starting from it stacks the
chain. Files are stored with the uids inside the sandbox (0 for root, 1000 for its user):
the copy reads the sandbox's layers through an idmapped mount that shifts its host uids back,
and each sandbox started from it sees them through its own idmapped mount (rootfs.py). The
copy is made in a staging directory renamed into place: an interrupted capture leaves
nothing a sandbox could start from.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from corral.runtime import idmap, uids
from corral.runtime.mounts import unmount

META = "snapshot.json"
DELETED = "deleted"  # a removed snapshot kept for the snapshots that build on it
MAX_CHAIN = 16  # an overlay's lower layers are few: a deeper chain is refused


class SnapshotError(RuntimeError):
    """A snapshot that cannot be made, used or removed (the message says why)."""


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    image: str | None
    template: str | None
    parent: str | None
    bytes: int


def read_info(directory: Path) -> SnapshotInfo:
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        raise SnapshotError(f"snapshot {directory.name} is not on this node") from None
    return SnapshotInfo(
        directory.name, meta.get("image"), meta.get("template"), meta.get("parent"),
        int(meta["bytes"]),
    )  # fmt: skip


def chain(snapshots_dir: Path, snapshot_id: str) -> list[Path]:
    """The snapshot's directory and its parents', newest first."""
    found: list[Path] = []
    current: str | None = snapshot_id
    while current is not None:
        if len(found) >= MAX_CHAIN:
            raise SnapshotError(f"snapshot {snapshot_id} has over {MAX_CHAIN} parents")
        directory = snapshots_dir / current
        info = read_info(directory)
        found.append(directory)
        current = info.parent
    return found


def _reverse_mapping(base: int) -> str:
    """A user namespace map under which the sandbox's host uids show as the uids inside."""
    lines, offset = [], 0
    for first, count in uids.EXTENTS:
        lines.append(f"{base + offset} {first} {count}\n")
        offset += count
    return "".join(lines)


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _copy(source: str, target: Path, *, full: str, failed: str) -> None:
    """GNU cp as root: owners (as an idmapped view shows them), modes, times, xattrs (the
    overlay's opaque marks), whiteouts (0/0 character devices), hard links, symlinks as
    links; never leaves the source's file system. SnapshotError `full` or `failed`."""
    done = subprocess.run(
        ["cp", "-a", "--one-file-system", "--", source, str(target)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SnapshotError(full if "No space left" in done.stderr else failed)


def capture(
    snapshots_dir: Path,
    snapshot_id: str,
    *,
    scratch: Path,
    layers: dict[str, Path],
    base_uid: int,
    image: str | None,
    template: str | None = None,
    parent: str | None = None,
) -> int:
    """Copy the sandbox's writable layers (`layers`: "root" and "workspace" -> its upper dirs)
    into snapshot `snapshot_id`; `scratch` is an empty directory of the sandbox's for the
    idmapped views. Returns the snapshot's bytes. The caller freezes the sandbox."""
    final = snapshots_dir / snapshot_id
    if os.path.lexists(final):
        raise SnapshotError(f"snapshot {snapshot_id} exists")
    snapshots_dir.mkdir(mode=0o700, exist_ok=True)
    staging = snapshots_dir / f".staging-{snapshot_id}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(mode=0o700)
    userns = idmap.user_namespace(_reverse_mapping(base_uid))
    views: list[Path] = []
    try:
        for name, source in layers.items():
            view = scratch / f"capture-{name}"
            view.mkdir(mode=0o700, exist_ok=True)
            idmap.mount_idmapped(source, view, userns)
            views.append(view)
            _copy(f"{view}/.", staging / name, full="the node's disk is full",
                  failed="could not copy the sandbox's files")  # fmt: skip
        size = _tree_bytes(staging)
        meta = {"image": image, "template": template, "parent": parent, "bytes": size}
        (staging / META).write_text(json.dumps(meta))
        os.chmod(staging, 0o755)  # traversable by the idmapped views of sandboxes
        staging.rename(final)
        return size
    except BaseException:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(staging)], check=False)
        raise
    finally:
        os.close(userns)
        for view in views:
            unmount(view)
            try:
                view.rmdir()
            except OSError:
                pass


def restore(snapshot: Path, names: tuple[str, ...], into: Path, base_uid: int) -> None:
    """Copy a template sandbox's snapshot into a new sandbox's directories (`into`/NAME for
    each name), its files owned by that sandbox's uids (through an idmapped view)."""
    userns = idmap.user_namespace(uids.mapping(base_uid))
    view = into / ".snapshot-view"
    view.mkdir(mode=0o700, exist_ok=True)
    try:
        idmap.mount_idmapped(snapshot, view, userns)
        for name in names:
            if not (view / name).is_dir():
                continue
            target = into / name
            if os.path.lexists(target):
                subprocess.run(["rm", "-rf", "--one-file-system", "--", str(target)], check=True)
            _copy(str(view / name), target,
                  full="the sandbox's disk is too small for the snapshot",
                  failed="could not copy the snapshot's files")  # fmt: skip
    finally:
        os.close(userns)
        unmount(view)
        try:
            view.rmdir()
        except OSError:
            pass


def children(snapshots_dir: Path, snapshot_id: str) -> list[str]:
    if not snapshots_dir.is_dir():
        return []
    found = []
    for entry in snapshots_dir.iterdir():
        if entry.name.startswith(".") or entry.name == snapshot_id:
            continue
        try:
            if read_info(entry).parent == snapshot_id:
                found.append(entry.name)
        except SnapshotError:
            continue
    return found


def remove(snapshots_dir: Path, snapshot_id: str) -> None:
    """Delete a snapshot (sandboxes started from it are the caller's to check: their roots
    stack it). One that other snapshots build on is only marked deleted: its files go with
    the last of them."""
    directory = snapshots_dir / snapshot_id
    if not os.path.lexists(directory):
        return
    if children(snapshots_dir, snapshot_id):
        (directory / DELETED).touch()
        return
    parent = read_info(directory).parent if (directory / META).exists() else None
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(directory)], check=True)
    if parent is not None and (snapshots_dir / parent / DELETED).exists():
        remove(snapshots_dir, parent)


def clean_staging(snapshots_dir: Path) -> None:
    """At node start: captures an earlier run left unfinished."""
    if snapshots_dir.is_dir():
        for entry in snapshots_dir.iterdir():
            if entry.name.startswith(".staging-"):
                subprocess.run(["rm", "-rf", "--one-file-system", "--", str(entry)], check=False)
