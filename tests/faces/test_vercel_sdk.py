"""The official `@vercel/sandbox` SDK (pinned in tests/js/package.json), unmodified, against the
Vercel face: one Node process runs every call (tests/js/vercel_sdk.mjs) with a `fetch` that
only rewrites `https://vercel.com/api` to the server, and each test checks what one step saw."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.faces.conftest import FacesServer, new_token

pytestmark = pytest.mark.sandbox

JS = Path(__file__).resolve().parent.parent / "js"
SDK_VERSION = "3.5.0"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is missing: scripts/setup.sh installs it")
        pytest.skip("node is not installed here (scripts/setup.sh installs it)")
    package = JS / "node_modules" / "@vercel" / "sandbox" / "package.json"
    if not package.exists():
        pytest.fail("tests/js/node_modules is missing: run scripts/setup.sh (npm ci)")
    installed = json.loads(package.read_text())["version"]
    assert installed == SDK_VERSION, f"@vercel/sandbox {installed} installed, {SDK_VERSION} pinned"
    return node


@pytest.fixture(scope="module")
def steps(faces_server: FacesServer) -> dict[str, dict[str, Any]]:
    scoped = new_token(faces_server, scopes=["read", "exec", "files", "sandboxes"])
    env = {
        **os.environ,
        "CORRAL_URL": faces_server.url,
        "CORRAL_TOKEN": faces_server.admin_key,
        "CORRAL_SCOPED_TOKEN": scoped,
    }
    done = subprocess.run(
        [_node(), str(JS / "vercel_sdk.mjs")],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def ok(steps: dict[str, dict[str, Any]], name: str) -> Any:
    result = steps.get(name)
    assert result is not None, f"step {name} did not run: {sorted(steps)}"
    assert result["ok"], result["error"]
    return result["value"]


def failed(steps: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    result = steps[name]
    assert not result["ok"], result
    return result["error"]


def test_create_v3(steps: dict[str, dict[str, Any]]) -> None:
    """`Sandbox.create()` posts to /v3/sandboxes and validates sandbox, session and routes."""
    created = ok(steps, "create")
    assert created["name"].startswith("sdk-") and created["status"] == "running"
    assert created["persistent"] is True and created["cwd"] == "/workspace"
    assert created["timeout"] == 600_000 and created["sessionTimeout"] == 600_000
    assert created["vcpus"] == 1 and created["memory"] == 2048
    assert created["tags"] == {"suite": "sdk"}
    [route] = created["routes"]
    sandbox = created["sessionId"]
    assert route["port"] == 3000 and route["subdomain"] == f"3000-{sandbox.replace('_', '-', 1)}"
    assert route["url"].endswith(f"/v1/sandboxes/{sandbox}/ports/3000")
    assert created["sessionId"].startswith("sb_") and created["networkPolicy"] == "deny-all"


def test_run_command_and_logs(steps: dict[str, dict[str, Any]]) -> None:
    waited = ok(steps, "run_wait")
    assert waited["exitCode"] == 3 and waited["cwd"] == "/workspace"
    assert waited["stdout"] == "out hello\n/workspace\n" and waited["stderr"] == "err\n"
    assert waited["streamed"] == waited["stdout"]  # the `stdout` Writable, as it ran
    assert ok(steps, "run_args_cwd_env") == {"exitCode": 0, "stdout": "a b hello\n/tmp\n"}


def test_detached_command(steps: dict[str, dict[str, Any]]) -> None:
    detached = ok(steps, "run_detached")
    assert detached["before"] is None and detached["exitCode"] == 4 and detached["again"] == 4
    assert [(log["stream"], log["data"]) for log in detached["logs"]] == [
        ("stdout", "1\n"),
        ("stdout", "2\n"),
        ("stdout", "3\n"),
        ("stderr", "gone\n"),
    ]
    assert detached["stdout"] == "1\n2\n3\n" and detached["output"] == "1\n2\n3\ngone\n"


def test_missing_program_is_a_result(steps: dict[str, dict[str, Any]]) -> None:
    """Not a stream error: a finished command, 127, and why on stderr."""
    missing = ok(steps, "missing_program")
    assert missing["exitCode"] == 127
    assert missing["stderr"].startswith("no-such-program: ")


def test_timeout_and_kill(steps: dict[str, dict[str, Any]]) -> None:
    assert ok(steps, "timeout_ms") == {"exitCode": 137}
    assert ok(steps, "kill") == {"exitCode": 137}  # and a second kill answered 200
    assert ok(steps, "kill_finished") == {"exitCode": 0}


def test_sudo_environment(steps: dict[str, dict[str, Any]]) -> None:
    sudo = ok(steps, "sudo_env")
    assert sudo["exitCode"] == 0, sudo["stderr"]
    assert sudo["stdout"] == "0\n/root\nuser\n"


def test_files(steps: dict[str, dict[str, Any]]) -> None:
    files = ok(steps, "files")
    assert files["read"] == "hi there\n" and files["nested"] == "a"
    assert files["missing"] is None and files["fsMissing"] == "ENOENT"
    assert files["fsRead"] == "via fs" and files["script"] == "run\n"
    assert files["readdir"] == ["fs.txt", "hello.txt", "made", "nested"]
    assert files["exists"] is True and files["mkdirExit"] == 0
    assert ok(steps, "large_file") == {"size": 11 << 20, "same": True}
    error = failed(steps, "mkdir_existing")
    assert error["status"] == 409 and error["json"]["error"]["code"] == "conflict"


def test_extend_timeout_and_update(steps: dict[str, dict[str, Any]]) -> None:
    assert ok(steps, "extend_timeout") == {"before": 600_000, "after": 660_000}
    # `update({timeout})`: the SDK extends the session by the increase.
    assert ok(steps, "update") == {"sessionTimeout": 720_000, "policy": "deny-all"}
    assert ok(steps, "get")["sessionTimeout"] == 720_000
    error = failed(steps, "update_tags")
    assert error["status"] == 400 and error["json"]["error"]["code"] == "unsupported"


def test_network_policy(steps: dict[str, dict[str, Any]]) -> None:
    assert ok(steps, "network_policy") == [
        {"subnets": {"allow": ["10.9.8.0/24"]}},
        "allow-all",
        "deny-all",
    ]
    domains = ok(steps, "network_policy_domains")
    # Corral keeps an allow-list sorted.
    want = {"allow": ["*.example.org", "example.com"], "subnets": {"allow": ["10.9.8.0/24"]}}
    assert domains == {"policy": want, "stored": want}
    error = failed(steps, "network_policy_transform")
    assert error["status"] == 400 and error["json"]["error"]["code"] == "unsupported"


def test_users_and_groups(steps: dict[str, dict[str, Any]]) -> None:
    made = ok(steps, "users_groups")
    assert made["username"] == "alice" and made["homeDir"] == "/home/alice"
    assert made["group"] == {"groupname": "devs", "sharedDir": "/shared/devs"}
    assert made["exitCode"] == 0
    lines = made["check"].splitlines()
    assert "(devs)" in lines[0]
    assert lines[1] == "alice:user 770"
    # The group's directory: its mode keeps no setgid bit (the sandbox's root has no
    # CAP_FSETID), but its members can work in it.
    assert lines[2].startswith("user:devs ") and lines[2].endswith("770")
    assert lines[3] == "alice"


def test_as_user_runs_through_sudo(steps: dict[str, dict[str, Any]]) -> None:
    """`asUser` and a created user's commands and files run as that user, through `sudo -u`
    (which the face runs itself: a setuid sudo cannot work in a sandbox)."""
    done = ok(steps, "as_user")
    assert done["who"] == "alice alice devs /home/alice /home/alice user hi"
    assert done["back"] == "from alice" and done["owner"] == "alice"
    assert done["missing"] is None
    assert done["root"] == "root"
    assert done["stranger"]["exitCode"] == 127
    assert "nobody-here" in done["stranger"]["stderr"]


def test_a_port_is_served_at_its_route(steps: dict[str, dict[str, Any]]) -> None:
    """A port given at create is served at its route's URL without a token, as Vercel's are."""
    assert ok(steps, "port_route") == {"status": 200, "body": "served\n"}


def test_get_list_and_sessions(steps: dict[str, dict[str, Any]]) -> None:
    created, got = ok(steps, "create"), ok(steps, "get")
    assert got["name"] == created["name"] and got["sessionId"] == created["sessionId"]
    assert got["status"] == "running" and got["routes"] == created["routes"]
    # The SDK makes the domain itself, from the route's subdomain, always under vercel.run.
    assert got["domain"] == f"https://{created['routes'][0]['subdomain']}.vercel.run"
    assert got["missing"] == "No route for port 4000"
    listed = ok(steps, "list")
    assert created["name"] in listed["names"]
    assert all(n.startswith("sdk-") for n in listed["names"])
    assert listed["pagination"]["next"] is None
    assert ok(steps, "list_sessions") == {"ids": [created["sessionId"]], "statuses": ["running"]}


def test_stop_and_resume(steps: dict[str, dict[str, Any]]) -> None:
    assert ok(steps, "stop") == {"status": "stopped", "sandboxStatus": "stopped"}
    assert ok(steps, "get_stopped") == {"status": "stopped"}
    assert ok(steps, "resume") == {"status": "running", "resumed": True, "kept": "hi there\n"}
    resumed = ok(steps, "auto_resume")
    assert resumed == {"exitCode": 0, "stdout": "hi there\n", "status": "running"}


def test_snapshot_and_create_from_it(steps: dict[str, dict[str, Any]]) -> None:
    snapshot = ok(steps, "snapshot")
    assert snapshot["id"].startswith("snap_") and snapshot["status"] == "created"
    assert snapshot["sourceSessionId"] == ok(steps, "create")["sessionId"]
    assert snapshot["sizeBytes"] > 0 and snapshot["expires"] is True
    assert snapshot["sessionStatus"] == "stopped"  # a snapshot stops its session
    assert snapshot["got"] == snapshot["id"] and snapshot["listed"] == [snapshot["id"]]
    started = ok(steps, "create_from_snapshot")
    assert started["kept"] == "in the snapshot"
    assert started["sourceSnapshotId"] == snapshot["id"] and started["timeout"] == 300_000
    error = failed(steps, "create_from_missing_snapshot")
    assert error["status"] == 410 and error["json"]["error"]["code"] == "snapshot_not_found"
    assert ok(steps, "snapshot_delete") == {"status": "deleted"}


def test_fork(steps: dict[str, dict[str, Any]]) -> None:
    fork, created = ok(steps, "fork"), ok(steps, "create")
    assert fork["name"] == created["name"] + "-fork" and fork["kept"] == "in the snapshot"
    assert fork["sessionId"] != created["sessionId"]
    assert fork["tags"] == {"suite": "sdk"} and fork["vcpus"] == 1
    assert fork["timeout"] == 720_000  # its source's
    assert ok(steps, "get_or_create") == {"created": 1, "same": True}


def test_delete_then_404(steps: dict[str, dict[str, Any]]) -> None:
    after = ok(steps, "delete")["after"]
    assert after["status"] == 404 and after["json"]["error"]["code"] == "not_found"


def test_v2_create_with_a_runtime(steps: dict[str, dict[str, Any]]) -> None:
    v2 = ok(steps, "create_v2_runtime")
    assert v2["status"] == "running" and v2["name"].startswith("sb_")
    assert v2["timeout"] == 120_000 and v2["stdout"] == "v2\n"


def test_scoped_token(steps: dict[str, dict[str, Any]]) -> None:
    """A Corral token with the scopes of a Vercel user's token, not the admin key."""
    assert ok(steps, "scoped_token") == {"stdout": "user\n", "read": "scoped"}
