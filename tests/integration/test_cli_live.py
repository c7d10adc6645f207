"""The `corral` command's live side: `exec --stream`, `attach`, `cp` both ways, `run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.integration.helpers import module_sandbox_id  # noqa: F401 - a fixture

pytestmark = pytest.mark.sandbox


def corral(
    server: Server, *args: str, stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_TOKEN": server.admin_key}
    return subprocess.run(
        [sys.executable, "-m", "corral.cli.main", *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def test_exec_stream(server: Server, sandbox_id: str) -> None:
    result = corral(server, "exec", "--stream", sandbox_id, "--",
                    "for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 5")  # fmt: skip
    assert result.returncode == 5
    assert result.stdout == b"out1\nout2\nout3\n"
    assert result.stderr == b"err1\nerr2\nerr3\n"
    timed_out = corral(server, "exec", "--stream", "--timeout", "0.3", sandbox_id, "--", "sleep 9")
    assert timed_out.returncode == 124 and b"timed out" in timed_out.stderr
    stdin = corral(server, "exec", "--stream", "-i", sandbox_id, "--", "wc -c", stdin=b"12345")
    assert stdin.stdout.strip() == b"5"
    not_run = corral(server, "exec", "--stream", sandbox_id, "--", "/nonexistent/program", "x")
    assert not_run.returncode == 125 and b"failed to start" in not_run.stderr


def test_attach(server: Server, api: httpx.Client, sandbox_id: str) -> None:
    started = api.post(
        f"/v1/sandboxes/{sandbox_id}/commands",
        json={"command": "printf 'a\\n'; sleep 0.5; printf 'b\\n'; exit 3"},
    ).json()
    result = corral(server, "attach", sandbox_id, started["id"])
    assert (result.returncode, result.stdout) == (3, b"a\nb\n")
    events = api.get(f"/v1/sandboxes/{sandbox_id}/commands/{started['id']}/logs").text
    second = json.loads(events.splitlines()[1])
    assert second["data"] == "b\n"
    tail = corral(server, "attach", sandbox_id, started["id"], "--offset", str(second["offset"]))
    assert (tail.returncode, tail.stdout) == (3, b"b\n")
    missing = corral(server, "attach", sandbox_id, "cmd_nope")
    assert missing.returncode == 1 and b"not_found" in missing.stderr


def test_cp_both_ways(server: Server, sandbox_id: str, tmp_path: Path) -> None:
    src = tmp_path / "proj"
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "code.py").write_text("x = 1\n")
    (src / "data.bin").write_bytes(os.urandom(100_000))
    (src / "tool").write_text("#!/bin/sh\necho tool\n")
    (src / "tool").chmod(0o755)

    # A directory onto a missing path: becomes that path; onto an existing one: goes inside.
    assert corral(server, "cp", str(src), f"{sandbox_id}:/workspace/copy").returncode == 0
    assert corral(server, "cp", str(src), f"{sandbox_id}:/workspace/copy").returncode == 0
    listing = corral(server, "exec", sandbox_id, "--", "ls copy copy/proj; ./copy/tool")
    assert listing.stdout.decode().split() == [
        "copy:", "data.bin", "lib", "proj", "tool", "copy/proj:", "data.bin", "lib", "tool",
        "tool",
    ]  # fmt: skip

    # Files, into a directory or to a name; stdin and stdout.
    assert corral(server, "cp", str(src / "data.bin"), f"{sandbox_id}:/workspace/").returncode == 0
    assert corral(server, "cp", "-", f"{sandbox_id}:notes.txt", stdin=b"piped\n").returncode == 0
    assert corral(server, "cp", f"{sandbox_id}:notes.txt", "-").stdout == b"piped\n"
    back = tmp_path / "back.bin"
    assert corral(server, "cp", f"{sandbox_id}:/workspace/data.bin", str(back)).returncode == 0
    assert back.read_bytes() == (src / "data.bin").read_bytes()

    # And the directory back.
    out = tmp_path / "out"
    assert corral(server, "cp", f"{sandbox_id}:/workspace/copy/proj", str(out)).returncode == 0
    assert (out / "lib" / "code.py").read_text() == "x = 1\n"
    assert (out / "tool").stat().st_mode & 0o777 == 0o755
    assert (out / "data.bin").read_bytes() == (src / "data.bin").read_bytes()
    archive = corral(server, "cp", f"{sandbox_id}:/workspace/copy/proj", "-").stdout
    assert archive[:2] == b"\x1f\x8b"  # a gzip stream

    missing = corral(server, "cp", f"{sandbox_id}:/workspace/none", str(tmp_path / "x"))
    assert missing.returncode == 1 and b"no such file" in missing.stderr
    both_local = corral(server, "cp", str(src), str(tmp_path / "y"))
    assert both_local.returncode == 2


def test_run(server: Server, sandbox_id: str, tmp_path: Path) -> None:
    script = tmp_path / "hello.ts"
    script.write_text('console.log("hi", Deno.args[0]); result.set({ ok: true, answer: 42 });\n')
    result = corral(server, "run", sandbox_id, str(script), "--", "there")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [b"hi there", b'{"ok": true, "answer": 42}']

    failed = corral(server, "run", sandbox_id, "-l", "python", "-c", "result.error('nope')")
    assert failed.returncode == 1 and b"error: nope" in failed.stderr
    as_json = corral(server, "run", sandbox_id, "-l", "bash", "-c", "echo $1", "--json", "--", "x")
    parsed = json.loads(as_json.stdout)
    assert parsed["stdout"] == "x\n" and parsed["exit_code"] == 0
    unknown = corral(server, "run", sandbox_id, "-c", "1")
    assert unknown.returncode == 2 and b"--language" in unknown.stderr


def test_ctrl_c_detaches_and_attach_resumes(server: Server, sandbox_id: str) -> None:
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_TOKEN": server.admin_key}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli.main", "exec", "--stream", sandbox_id, "--",
         "echo first; sleep 2; echo second"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"first\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and out == b""
    hint = err.decode().strip().splitlines()[-1]
    assert "detached" in hint and "corral attach" in hint
    command = hint.split("corral attach ", 1)[1].split()  # SANDBOX CMD_ID --offset N
    resumed = corral(server, "attach", *command)
    assert (resumed.returncode, resumed.stdout) == (0, b"second\n")


def test_shell_with_piped_input(server: Server, sandbox_id: str) -> None:
    result = corral(server, "shell", sandbox_id, "--", "sh", "-c", "read x; echo got:$x; exit 4",
                    stdin=b"hello\n")  # fmt: skip
    assert result.returncode == 4
    assert b"got:hello" in result.stdout
