"""The node sets the host's cgroup2 hierarchy to favor dynamic modifications (favordynmods), so
that a command's first cgroup move after a quiet spell does not wait for an RCU grace period;
an operator can leave the hierarchy as it is."""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.runtime.cgroups import FAVOR_DYNMODS, find_cgroup2, super_options

from ..conftest import Server, make_data_dir

MS_REMOUNT = 32
# Per-mount flags, given again on a remount (left out, the kernel would clear them).
MOUNT_FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024,
               "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}  # fmt: skip
MOUNT = find_cgroup2()

pytestmark = pytest.mark.skipif(
    MOUNT is None or os.geteuid() != 0, reason="needs root and a writable cgroup2 hierarchy"
)


def mount_flags(mount: Path) -> int:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mount):
            return sum(MOUNT_FLAGS.get(name, 0) for name in fields[5].split(","))
    raise AssertionError(f"{mount} is not mounted")


def set_favor(on: bool) -> None:
    """Remount the hierarchy with or without the option, every other option as it was."""
    assert MOUNT is not None
    options = (super_options(MOUNT) or set()) - {"rw", "ro", FAVOR_DYNMODS}
    if on:
        options.add(FAVOR_DYNMODS)
    libc = ctypes.CDLL(None, use_errno=True)
    data = ",".join(sorted(options)).encode()
    flags = MS_REMOUNT | mount_flags(MOUNT)
    if libc.mount(None, str(MOUNT).encode(), None, flags, data) != 0:
        errno = ctypes.get_errno()
        pytest.skip(f"cannot remount {MOUNT}: {os.strerror(errno)}")


@pytest.fixture
def favor_off() -> Iterator[None]:
    assert MOUNT is not None
    was = FAVOR_DYNMODS in (super_options(MOUNT) or set())
    set_favor(False)
    yield
    set_favor(was or True)  # as the suite's other servers set it


def serve(env: dict[str, str] | None = None) -> tuple[Server, Path]:
    data_dir = make_data_dir("corral-cgopt-")
    server = Server(data_dir, env=env)
    server.start()
    return server, data_dir


def test_the_node_turns_the_option_on(favor_off: None) -> None:
    assert MOUNT is not None
    assert FAVOR_DYNMODS not in (super_options(MOUNT) or set())
    server, data_dir = serve()
    try:
        assert FAVOR_DYNMODS in (super_options(MOUNT) or set())
        with server.client() as api:
            sid = api.post("/v1/sandboxes", json={}).json()["id"]
            ran = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "true", "args": []})
            assert ran.status_code == 200 and ran.json()["exit_code"] == 0
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_an_operator_can_keep_the_hierarchy_as_it_is(favor_off: None) -> None:
    assert MOUNT is not None
    server, data_dir = serve({"CORRAL_CGROUP_FAVOR_DYNMODS": "false"})
    try:
        assert FAVOR_DYNMODS not in (super_options(MOUNT) or set())
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
