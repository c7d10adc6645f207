"""Acceptance: `corral shell` driven from a real terminal (pexpect): it runs commands with line
editing, follows the window size, passes Ctrl-C to the sandbox, and restores the terminal."""

from __future__ import annotations

import os
import re
import sys
import time

import pexpect
import pytest

from tests.conftest import Server
from tests.integration.helpers import module_sandbox_id  # noqa: F401 - a fixture

pytestmark = pytest.mark.sandbox


PROMPT = re.compile(r"user@sandbox:\S*\$ ")


def spawn_shell(server: Server, sandbox_id: str, *args: str) -> pexpect.spawn:
    env = {
        **os.environ,
        "CORRAL_URL": server.url,
        "CORRAL_TOKEN": server.admin_key,
        "TERM": "xterm",
    }
    return pexpect.spawn(
        sys.executable,
        ["-m", "corral.cli.main", "shell", sandbox_id, *args],
        env=env,
        dimensions=(30, 100),
        timeout=15,
        encoding="utf-8",
    )


def run(child: pexpect.spawn, line: str, expect: str) -> None:
    child.sendline(line)
    child.expect(expect)
    child.expect(PROMPT)


def test_interactive_shell(server: Server, sandbox_id: str) -> None:
    child = spawn_shell(server, sandbox_id)
    try:
        child.expect(PROMPT)
        run(child, "echo $((6 * 7)) $(id -u)", "42 1000")
        run(child, "stty size", "30 100")

        # The window size follows the local terminal (SIGWINCH -> resize).
        child.setwinsize(41, 123)
        deadline = time.monotonic() + 5
        while True:
            child.sendline("stty size")
            index = child.expect(["41 123", "30 100"])
            child.expect(PROMPT)
            if index == 0:
                break
            assert time.monotonic() < deadline, "the resize never arrived"
            time.sleep(0.1)

        # Ctrl-C reaches the sandbox's foreground process, not the local corral process.
        child.sendline("sleep 100; echo not-interrupted")
        time.sleep(0.5)
        started = time.monotonic()
        child.sendcontrol("c")
        child.expect(PROMPT)
        assert time.monotonic() - started < 5
        assert "\nnot-interrupted" not in child.before  # (the typed line echoes it)
        run(child, "echo status=$?", "status=130")

        # Line editing: readline sees control keys (Ctrl-A: start of line).
        child.send("cho edited")
        child.sendcontrol("a")
        child.send("e")
        child.sendline("")
        child.expect(r"[\r\n]edited\r\n")
        child.expect(PROMPT)

        # Job control and a full-screen-ish program's view of the terminal.
        run(child, "tty >/dev/null; echo tty=$?; test -t 0 && echo interactive", "interactive")

        child.sendline("exit 7")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 7


def test_shell_runs_a_given_command_and_reports_errors(server: Server, sandbox_id: str) -> None:
    child = spawn_shell(server, sandbox_id, "--", "sh", "-c", "read x; echo got:$x; exit 3")
    try:
        child.sendline("hello")
        child.expect("got:hello")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 3

    missing = spawn_shell(server, "sb_0000000000doesnotexist00")
    try:
        missing.expect("not_found")
        missing.expect(pexpect.EOF)
    finally:
        missing.close()
    assert missing.exitstatus == 1


def test_terminal_is_restored_afterwards(server: Server, sandbox_id: str) -> None:
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_TOKEN": server.admin_key}
    script = f"{sys.executable} -m corral.cli.main shell {sandbox_id} -- true; stty -a"
    child = pexpect.spawn("sh", ["-c", script], env=env, timeout=15, encoding="utf-8")
    try:
        child.expect(pexpect.EOF)
    finally:
        child.close()
    settings = child.before.split()
    # Raw mode during the session; cooked (line editing, echo, signals) again after it.
    assert {"icanon", "echo", "isig"} <= set(settings), child.before
