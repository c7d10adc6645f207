"""Shared fixtures: a real Corral server on a loopback port, with a real data dir and SQLite."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.runtime.uids import SLOT_UIDS
from tests.engines import free_port

pytest_plugins = ["tests.debian_fixtures"]  # the Debian test image and a local .deb

ADMIN_KEY = "crl_test_admin_" + os.urandom(8).hex()


def make_data_dir(prefix: str) -> Path:
    # Sandboxes' uids must be able to traverse to their workspaces: not under a 0700 dir.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


# Blocks of host uids for 127 sandbox slots each (runtime/uids.py), 200 blocks per test process
# (the suite starts well over a hundred servers): test runs side by side on one machine must not
# share uids. Below the range tests/security/helpers.py draws dedicated servers' blocks from.
UID_SLOTS = 127
UID_BLOCK = SLOT_UIDS * (UID_SLOTS + 1)
UID_RANGES = 100  # of 200 blocks each, one per test process running at the time


def _take_uid_range() -> int:
    """The index of a range no other test process on this machine holds: each one keeps an
    exclusive lock on its range's file while it lives, so runs side by side never share uids."""
    for index in random.sample(range(UID_RANGES), UID_RANGES):
        fd = os.open(f"/tmp/corral-test-uids-{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _uid_range_locks.append(fd)  # held until this process ends
        return index
    raise RuntimeError(f"all {UID_RANGES} test uid ranges are taken by other test runs")


_uid_range_locks: list[int] = []
_uid_first = 300_000 + _take_uid_range() * 200 * UID_BLOCK
_uid_blocks = iter(range(_uid_first, _uid_first + 200 * UID_BLOCK, UID_BLOCK))


def next_uid_block() -> int:
    """The first uid of a block no other server or node of this test run uses."""
    return next(_uid_blocks)


class Server:
    """`corral serve` in a subprocess, as an operator would run it.

    Each server gets its own block of host uids and its own cgroup, so that tests can tell its
    sandboxes' processes from those of other servers.
    """

    def __init__(self, data_dir: Path, *, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key = ADMIN_KEY
        self.cgroup_name = "corral-test-" + data_dir.name
        self.uid_base = next(_uid_blocks)
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "server.log"

    def start(self) -> None:
        env = {
            **os.environ,
            "CORRAL_ADMIN_KEY": self.admin_key,
            "CORRAL_CGROUP_ROOT": self.cgroup_name,
            "CORRAL_UID_BASE": str(self.uid_base),
            "CORRAL_UID_COUNT": str(UID_SLOTS),
            "CORRAL_LOG_LEVEL": "warning",
            "CORRAL_WARM_POOL": "0",  # tests that want a pool ask for one
            **self.extra_env,
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.cli.main", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--data-dir", str(self.data_dir)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.proc.kill()  # never left behind, holding its uids and cgroup, by a failed start
        self.proc.wait()
        raise RuntimeError(f"server did not become ready: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.admin_key}"},
            timeout=60,
        )


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    data_dir = make_data_dir("corral-test-")
    srv = Server(data_dir)
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture
def sandbox_id(api: httpx.Client) -> Iterator[str]:
    resp = api.post("/v1/sandboxes", json={})
    assert resp.status_code == 201, resp.text
    sid = resp.json()["id"]
    yield sid
    api.delete(f"/v1/sandboxes/{sid}")
