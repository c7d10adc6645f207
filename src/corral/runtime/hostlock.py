"""What a node holds alone on its host, locked so that two nodes never clean up or reuse each
other's sandboxes.

A node (the server's built-in one, or a fleet agent) claims for its whole life: its data dir,
its cgroup root, its block of host uids, its nftables table, and a range of sandbox link
addresses, chosen here so that no two live nodes' ranges overlap. A node's start-up clean-up
kills whatever it finds under these, so it must hold them before that clean-up runs.

Each live holder has one lock file in LOCK_DIR, held with flock(2) for as long as the process
lives and holding its claim as JSON. A file whose flock can be taken belongs to a process that
is gone: it is removed, and what it claimed is free (the new holder's clean-up takes it over).
Files are examined and written under a registry lock, so two nodes starting at once see each
other. Ranges are compared for overlap, not for equal starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.runtime import uids
from corral.runtime.netpolicy import SUBNET, NetworkManager

LOCK_DIR = Path("/run/corral/locks")
REGISTRY = ".registry"
REGISTRY_WAIT = 10.0  # seconds
LINK_ADDRESSES = 4  # a /30 per sandbox slot: network, host end, sandbox end, broadcast


class HostConflict(RuntimeError):
    """Another live node holds some of what this one needs; the message names the settings
    to change."""


@dataclass(frozen=True)
class NodeClaim:
    data_dir: str
    cgroup_root: str
    uids: range  # host uids of the node's sandboxes
    net_table: str  # nftables table, also the prefix of its netns and veth names
    link_slots: int  # sandbox slots that need link addresses


def node_claim(*, data_dir: Path, cgroup_root: str, uid_base: int, uid_count: int) -> NodeClaim:
    """The claim of a node with these settings: a block of host uids per sandbox slot, slots 0
    to uid_count (runtime/uids.py), and the network table named after the cgroup root."""
    return NodeClaim(
        data_dir=str(data_dir),
        cgroup_root=cgroup_root,
        uids=uids.pool_range(uid_base, uid_count),
        net_table=NetworkManager(cgroup_root).table,
        link_slots=uid_count + 1,
    )


@dataclass
class NodeLock:
    """A held claim; released by `release()` or when the process ends, however it ends."""

    claim: NodeClaim
    link_subnet: ipaddress.IPv4Network  # this node's sandbox link addresses
    path: Path
    _fd: int | None = field(repr=False)

    def release(self) -> None:
        if self._fd is None:
            return
        with _registry(self.path.parent):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


def acquire(
    claim: NodeClaim,
    *,
    lock_dir: Path = LOCK_DIR,
    link_pool: ipaddress.IPv4Network = SUBNET,
) -> NodeLock:
    """Take `claim`, with the first free range of link addresses in `link_pool`; raises
    HostConflict, naming every clash and the settings that resolve it."""
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _registry(lock_dir):
        holders = list(_live_holders(lock_dir))
        problems = [p for other in holders for p in _clashes(claim, other)]
        subnet = _free_subnet(claim.link_slots, link_pool, holders)
        if subnet is None:
            problems.append(
                f"no free range of {claim.link_slots} sandbox link addresses (/30 each) is "
                f"left in {link_pool}, which the other live nodes share: lower "
                "CORRAL_UID_COUNT (one link per uid pair)"
            )
        if problems:
            raise HostConflict(
                "another Corral node on this host holds what this one needs:\n  - "
                + "\n  - ".join(problems)
            )
        assert subnet is not None
        path = lock_dir / f"node-{os.getpid()}-{secrets.token_hex(4)}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            record = {
                "pid": os.getpid(),
                "started_at": time.time(),
                "data_dir": claim.data_dir,
                "cgroup_root": claim.cgroup_root,
                "uids": [claim.uids.start, claim.uids.stop],
                "net_table": claim.net_table,
                "link_subnet": str(subnet),
            }
            os.write(fd, json.dumps(record).encode())
        except BaseException:
            os.close(fd)
            path.unlink()
            raise
    return NodeLock(claim, subnet, path, fd)


@contextlib.contextmanager
def _registry(lock_dir: Path) -> Iterator[None]:
    fd = os.open(lock_dir / REGISTRY, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # Held only while lock files are examined or changed: a moment, unless its holder
        # is stopped.
        deadline = time.monotonic() + REGISTRY_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HostConflict(
                        f"{lock_dir / REGISTRY} stayed locked for {REGISTRY_WAIT:.0f} s: another "
                        "Corral node is stuck starting or stopping"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def _live_holders(lock_dir: Path) -> Iterator[dict[str, Any]]:
    """The claims of live holders; lock files of dead ones are removed on the way."""
    for path in sorted(lock_dir.glob("node-*.lock")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                data = os.read(fd, 1 << 16)
                with contextlib.suppress(ValueError):
                    record = json.loads(data)
                    if isinstance(record, dict):
                        yield record
                continue
            path.unlink()  # its process is gone, and so is its hold
        finally:
            os.close(fd)


def _clashes(claim: NodeClaim, other: dict[str, Any]) -> list[str]:
    who = f"a live Corral node (pid {other.get('pid')}, data dir {other.get('data_dir')})"
    found = []
    if other.get("data_dir") == claim.data_dir:
        found.append(
            f"the data dir {claim.data_dir} is in use by {who}: give each server its own "
            "data dir (--data-dir, CORRAL_DATA_DIR)"
        )
    if other.get("cgroup_root") == claim.cgroup_root:
        found.append(
            f"the cgroup root {claim.cgroup_root!r} is held by {who}: set CORRAL_CGROUP_ROOT "
            "to another name"
        )
    with contextlib.suppress(TypeError, ValueError):
        start, stop = (int(u) for u in other.get("uids", ()))
        if start < claim.uids.stop and claim.uids.start < stop:
            found.append(
                f"host uids {claim.uids.start}-{claim.uids.stop - 1} overlap "
                f"{start}-{stop - 1}, held by {who}: set CORRAL_UID_BASE (and "
                "CORRAL_UID_COUNT; each sandbox takes two uids) so that the blocks do not "
                "overlap"
            )
    if other.get("net_table") == claim.net_table and other.get("cgroup_root") != (
        claim.cgroup_root
    ):
        found.append(
            f"the nftables table {claim.net_table} (named after the cgroup root) is held by "
            f"{who}, whose cgroup root {other.get('cgroup_root')!r} names it too: set "
            "CORRAL_CGROUP_ROOT to another name"
        )
    return found


def _free_subnet(
    slots: int, pool: ipaddress.IPv4Network, holders: list[dict[str, Any]]
) -> ipaddress.IPv4Network | None:
    """The first block of `pool` large enough for `slots` links that no holder's overlaps."""
    prefix = 32 - max(slots * LINK_ADDRESSES - 1, 1).bit_length()
    if prefix < pool.prefixlen:
        return None
    taken = []
    for other in holders:
        with contextlib.suppress(TypeError, ValueError):
            taken.append(ipaddress.ip_network(other.get("link_subnet", "")))
    for block in pool.subnets(new_prefix=prefix):
        if not any(block.overlaps(t) for t in taken):
            return block
    return None
