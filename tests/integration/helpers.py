"""Host-side checks used by the integration tests."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import UID_BLOCK

if TYPE_CHECKING:
    from tests.conftest import Server

UID_BASE = 200_000  # the lowest uid any test server gives its sandboxes


def sandbox_processes(uid_min: int = UID_BASE, uid_max: int = 2**32) -> list[tuple[int, int, str]]:
    """(pid, uid, cmdline) of live (non-zombie) host processes with a uid in [uid_min, uid_max)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields["Uid"].split()[0])
        state = fields["State"].split()[0]
        if uid_min <= uid < uid_max and state != "Z":
            found.append((int(entry.name), uid, cmdline))
    return found


def processes_matching(text: str) -> list[tuple[int, int, str]]:
    return [p for p in sandbox_processes() if text in p[2]]


def server_processes(uid_base: int) -> list[tuple[int, int, str]]:
    """Live processes of one test server's sandboxes."""
    return sandbox_processes(uid_base, uid_base + UID_BLOCK)


def cgroup_dirs(name: str) -> list[str]:
    for mount in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        base = Path(mount) / name
        if base.is_dir():
            return sorted(
                os.path.relpath(dirpath, base)
                for dirpath, _d, _f in os.walk(base)
                if dirpath != str(base)
            )
    return []


def sandbox_mounts() -> list[str]:
    """Mounts in the host's namespace that point into sandbox data dirs (there should be none)."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    return [line for line in mounts if "corral-test" in line]


def wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll until `predicate` holds or `seconds` pass; its last answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module", name="sandbox_id")
def module_sandbox_id(server: Server) -> Iterator[str]:
    """One sandbox for a whole module's tests, for modules whose tests use distinct paths and
    commands (import it there): keeps the number of sandboxes on the shared server low."""
    with server.client() as api:
        resp = api.post("/v1/sandboxes", json={})
        assert resp.status_code == 201, resp.text
        sid = resp.json()["id"]
        yield sid
        api.delete(f"/v1/sandboxes/{sid}")
