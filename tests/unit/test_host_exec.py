"""Host commands of a node opened with --host-exec: the named unprivileged user, never root, and
a timeout that ends the whole tree."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from corral.node.host_exec import HostExec, host_user
from corral.node.protocol import HostExecRefused

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def test_root_and_unknown_users_are_refused() -> None:
    with pytest.raises(HostExecRefused, match="never run as root"):
        host_user("root")
    with pytest.raises(HostExecRefused, match="no host user"):
        host_user("no-such-user-here")


def test_commands_run_as_the_user_and_a_timeout_kills_the_tree() -> None:
    async def main() -> None:
        host = HostExec("nobody")
        done = await host.start(
            "c1", "id -un; id -G | wc -w; echo e >&2", env={}, cwd=None, timeout_ms=5000
        )
        await done.done.wait()
        assert done.status == "completed" and done.exit_code == 0
        assert bytes(done.stdout).split(b"\n")[0] == b"nobody" and bytes(done.stderr) == b"e\n"
        slow = await host.start("c2", "sleep 307 & sleep 308", env={}, cwd=None, timeout_ms=300)
        await slow.done.wait()
        assert slow.status == "timed_out" and slow.exit_code == 137
        await asyncio.sleep(0.2)
        left = await asyncio.to_thread(
            subprocess.run, ["pgrep", "-u", "nobody", "-f", "sleep 30[78]"], capture_output=True
        )
        assert left.stdout == b""  # the background one too: its whole session was killed

    asyncio.run(main())
