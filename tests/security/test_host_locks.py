"""Two nodes on one host: a second server that would share the first one's cgroup root, host uids
or nftables table refuses to start, naming the setting to change, and leaves the first one's
sandboxes running; a lock left by a killed server is taken over."""

from __future__ import annotations

import ipaddress
import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.runtime import hostlock
from corral.runtime.netpolicy import NetworkManager
from corral.runtime.uids import SLOT_UIDS
from tests.conftest import Server, make_data_dir
from tests.security.helpers import create_sandbox, dedicated_server


def claim(
    tmp: Path, *, root: str = "corral-a", base: int = 500_000, count: int = 99
) -> hostlock.NodeClaim:
    return hostlock.node_claim(data_dir=tmp, cgroup_root=root, uid_base=base, uid_count=count)


# --- the lock itself (no server) ---


def test_overlapping_uid_blocks_clash_and_adjacent_ones_do_not(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    first = hostlock.acquire(claim(tmp_path / "a", base=500_000), lock_dir=locks)
    try:
        # 100 slots of uids from 500000 are held: a block starting inside them clashes, one
        # ending inside them too, one right after them not.
        held = 100 * SLOT_UIDS
        with pytest.raises(hostlock.HostConflict, match="CORRAL_UID_BASE"):
            hostlock.acquire(
                claim(tmp_path / "b", root="corral-b", base=500_000 + held - 50), lock_dir=locks
            )
        with pytest.raises(hostlock.HostConflict, match="CORRAL_UID_BASE"):
            hostlock.acquire(claim(tmp_path / "b", root="corral-b", base=499_900), lock_dir=locks)
        second = hostlock.acquire(claim(tmp_path / "b", root="corral-b", base=500_000 + held),
                                  lock_dir=locks)  # fmt: skip
        # Their sandbox link addresses never overlap either.
        assert not first.link_subnet.overlaps(second.link_subnet)
        second.release()
    finally:
        first.release()


def test_same_data_dir_or_cgroup_root_clash(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    first = hostlock.acquire(claim(tmp_path / "a"), lock_dir=locks)
    try:
        with pytest.raises(hostlock.HostConflict, match="CORRAL_CGROUP_ROOT"):
            hostlock.acquire(claim(tmp_path / "b", base=600_000), lock_dir=locks)
        with pytest.raises(hostlock.HostConflict, match="CORRAL_DATA_DIR"):
            hostlock.acquire(claim(tmp_path / "a", root="corral-b", base=600_000),
                             lock_dir=locks)  # fmt: skip
    finally:
        first.release()
    # Released: free again, and its file is gone.
    again = hostlock.acquire(claim(tmp_path / "b", base=600_000), lock_dir=locks)
    assert [p.name for p in locks.glob("node-*.lock")] == [again.path.name]
    again.release()


def test_link_addresses_run_out_with_a_message(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    pool = ipaddress.ip_network("10.200.0.0/22")  # 256 links
    first = hostlock.acquire(claim(tmp_path / "a", count=199), lock_dir=locks, link_pool=pool)
    try:
        with pytest.raises(hostlock.HostConflict, match="CORRAL_UID_COUNT"):
            hostlock.acquire(claim(tmp_path / "b", root="corral-b", base=600_000, count=99),
                             lock_dir=locks, link_pool=pool)  # fmt: skip
    finally:
        first.release()


def test_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    code = (
        "import os, sys; from pathlib import Path; from corral.runtime import hostlock\n"
        "c = hostlock.node_claim(data_dir=Path(sys.argv[2]), cgroup_root='corral-a', "
        "uid_base=500000, uid_count=99)\n"
        "hostlock.acquire(c, lock_dir=Path(sys.argv[1]))\n"
        "print('held', flush=True); os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(locks), str(tmp_path / "a")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.stdout == "held\n", done.stderr
    left = list(locks.glob("node-*.lock"))
    assert len(left) == 1  # the killed process could not remove it
    taken = hostlock.acquire(claim(tmp_path / "a"), lock_dir=locks)
    assert [p.name for p in locks.glob("node-*.lock")] == [taken.path.name]
    taken.release()


# --- real servers ---


def refused(srv: Server) -> str:
    """Start `srv`, which must exit non-zero; returns what it printed."""
    with pytest.raises(RuntimeError, match="server exited"):
        srv.start()
    assert srv.proc is not None and srv.proc.returncode != 0
    srv.proc = None
    return srv.log_path.read_text()


@pytest.fixture(scope="module")
def first() -> Iterator[tuple[Server, str]]:
    """A running server with a running sandbox that has a network (so a table and a netns),
    shared by the tests that try to start a second server beside it."""
    with dedicated_server("corral-lock-a-") as srv, srv.client() as api:
        sid = create_sandbox(api, network="allow", allow=["192.0.2.1/32"])
        yield srv, sid


@pytest.fixture
def second() -> Iterator[Server]:
    data_dir = make_data_dir("corral-lock-b-")
    srv = Server(data_dir)
    yield srv
    srv.stop()
    subprocess.run(["rm", "-rf", str(data_dir)], check=False)


def still_runs(srv: Server, sid: str) -> None:
    with srv.client() as api:
        resp = api.get(f"/v1/sandboxes/{sid}")
        assert resp.json()["state"] == "running", resp.text
        resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo alive"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["stdout"] == "alive\n"
    table = NetworkManager(srv.cgroup_name).table
    listed = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True)
    assert listed.returncode == 0, "the first server's network table was removed"


@pytest.mark.sandbox
def test_second_server_with_the_same_cgroup_root_refuses(
    first: tuple[Server, str], second: Server
) -> None:
    srv, sid = first
    second.cgroup_name = srv.cgroup_name
    out = refused(second)
    assert "CORRAL_CGROUP_ROOT" in out and srv.cgroup_name in out
    still_runs(srv, sid)


@pytest.mark.sandbox
def test_second_server_with_an_overlapping_uid_block_refuses(
    first: tuple[Server, str], second: Server
) -> None:
    srv, sid = first
    second.uid_base = srv.uid_base + 4_000  # inside the first block, not at its start
    out = refused(second)
    assert "CORRAL_UID_BASE" in out and "overlap" in out
    still_runs(srv, sid)


@pytest.mark.sandbox
def test_second_server_with_the_same_network_table_refuses(
    first: tuple[Server, str], second: Server
) -> None:
    srv, sid = first
    table = NetworkManager(srv.cgroup_name).table
    # Another cgroup root whose table has the same name (the name is a short hash of it).
    second.cgroup_name = next(
        name
        for name in (f"corral-other-{i}" for i in itertools.count())
        if NetworkManager(name).table == table
    )
    out = refused(second)
    assert table in out and "CORRAL_CGROUP_ROOT" in out
    still_runs(srv, sid)


@pytest.mark.sandbox
def test_lock_of_a_killed_server_is_taken_over() -> None:
    with dedicated_server("corral-lock-k-") as srv:
        with srv.client() as api:
            create_sandbox(api)
        pid = srv.proc.pid if srv.proc else 0
        mine = [p for p in hostlock.LOCK_DIR.glob(f"node-{pid}-*.lock")]
        assert len(mine) == 1
        srv.kill9()
        assert mine[0].exists()  # left behind by the killed process
        started = time.monotonic()
        srv.start()  # same cgroup root, uids and data dir: a restart after a crash
        assert time.monotonic() - started < 30
        assert not mine[0].exists()
        with srv.client() as api:
            sid = create_sandbox(api)
            resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo back"})
            assert resp.json()["stdout"] == "back\n", resp.text
