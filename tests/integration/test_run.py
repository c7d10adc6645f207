"""Acceptance: code runs. TypeScript's `result.set` comes back as JSON, `result.error` as an
error with a non-zero exit, Deno's permissions hold (env, files, network), and Python, JavaScript
and bash runs work alike. Runs are commands: they are in the history."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from corral import Client, ValidationError
from tests.conftest import Server
from tests.integration.helpers import module_sandbox_id  # noqa: F401 - a fixture

pytestmark = pytest.mark.sandbox


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, token=server.admin_key) as sdk:
        yield sdk


def run(api: httpx.Client, sid: str, **body: Any) -> dict[str, Any]:
    resp = api.post(f"/v1/sandboxes/{sid}/run", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_typescript_result_set(api: httpx.Client, sandbox_id: str) -> None:
    code = """
    interface Answer { ok: boolean; answer: number }
    const answer: Answer = { ok: true, answer: 6 * 7 };
    console.log("args:", Deno.args.join(","));
    result.set(answer);
    """
    out = run(api, sandbox_id, language="typescript", code=code, args=["a", "b c"])
    assert out["result"] == {"ok": True, "answer": 42}
    assert out["exit_code"] == 0 and out["status"] == "completed" and out["error"] is None
    assert out["stdout"] == "args: a,b c\n"
    assert out["command_id"].startswith("cmd_") and out["duration_ms"] >= 0


def test_typescript_result_error(api: httpx.Client, sandbox_id: str) -> None:
    code = 'result.error(new RangeError("out of range")); console.log("after");'
    out = run(api, sandbox_id, language="typescript", code=code)
    assert out["exit_code"] != 0 and out["result"] is None
    assert out["error"]["name"] == "RangeError" and out["error"]["message"] == "out of range"
    assert "main.ts" in out["error"]["stack"]
    assert out["stdout"] == "after\n"  # an error is recorded; the program is not cut short
    thrown = run(api, sandbox_id, language="typescript", code="throw new TypeError('bad')")
    assert thrown["exit_code"] == 1 and thrown["error"]["name"] == "TypeError"
    assert "TypeError: bad" in thrown["stderr"]
    plain = run(api, sandbox_id, language="javascript", code="result.error('plain text')")
    assert plain["exit_code"] == 1 and plain["error"] == {
        "name": None,
        "message": "plain text",
        "stack": None,
    }


def test_deno_permissions(api: httpx.Client, sandbox_id: str) -> None:
    env_code = """
    console.log(Deno.env.get("GIVEN"));
    Deno.env.get("NOT_GIVEN");
    """
    out = run(api, sandbox_id, language="typescript", code=env_code,
              env={"GIVEN": "yes"})  # fmt: skip
    assert out["stdout"] == "yes\n"
    assert out["exit_code"] != 0 and out["error"]["name"] == "NotCapable"
    assert "NOT_GIVEN" in out["error"]["message"]
    # HOME, PATH and the rest of the sandbox's environment are not readable either.
    home = run(api, sandbox_id, language="typescript", code='Deno.env.get("HOME")')
    assert home["error"]["name"] == "NotCapable"

    files = """
    await Deno.writeTextFile("/workspace/from-deno.txt", "written");
    await Deno.writeTextFile("/tmp/scratch.txt", "tmp");
    let denied = [];
    for (const path of ["/etc/passwd", "/opt/corral/run.py", "/proc/self/environ"]) {
      try { await Deno.readTextFile(path); } catch (e) { denied.push(e.name); }
    }
    try { await Deno.writeTextFile("/dev/shm/x", "x"); } catch (e) { denied.push(e.name); }
    try { new Deno.Command("true").outputSync(); } catch (e) { denied.push(e.name); }
    try { await fetch("http://127.0.0.1:8080/"); } catch (e) { denied.push(e.name); }
    result.set(denied);
    """
    out = run(api, sandbox_id, language="typescript", code=files)
    assert out["result"] == ["NotCapable"] * 6, out
    check = api.post(f"/v1/sandboxes/{sandbox_id}/exec",
                     json={"command": "cat from-deno.txt"}).json()  # fmt: skip
    assert check["stdout"] == "written"


def test_python_javascript_and_bash(client: Client, sandbox_id: str) -> None:
    py = client.run_code(
        sandbox_id,
        "import sys, os\nprint(sys.argv[1:], os.environ['X'])\nresult.set({'sum': sum([1, 2])})\n",
        language="python",
        args=["one"],
        env={"X": "from env"},
    )
    assert py.result == {"sum": 3} and py.stdout == "['one'] from env\n" and py.exit_code == 0
    from_module = client.run_code(
        sandbox_id, "from corral_result import result as r\nr.set([True, None])", language="python"
    )
    assert from_module.result == [True, None]
    py_error = client.run_code(
        sandbox_id, "def f():\n    raise KeyError('k')\nf()\n", language="python"
    )
    assert py_error.exit_code == 1 and py_error.error is not None
    assert py_error.error.name == "KeyError" and "line 3" in (py_error.error.stack or "")
    assert "Traceback" in py_error.stderr and "runpy" not in py_error.stderr
    py_explicit = client.run_code(sandbox_id, "result.error(ValueError('v'))", language="python")
    assert py_explicit.exit_code == 1 and py_explicit.error and py_explicit.error.message == "v"

    js = client.run_code(sandbox_id, "result.set([1, 'two', {three: 3}])", language="javascript")
    assert js.result == [1, "two", {"three": 3}]

    bash = client.run_code(sandbox_id, 'echo "hi $1"; result.set "{\\"n\\": 7}"',
                           language="bash", args=["you"])  # fmt: skip
    assert bash.stdout == "hi you\n" and bash.result == {"n": 7}
    bash_error = client.run_code(sandbox_id, "result.error broke; echo unreachable",
                                 language="bash")  # fmt: skip
    assert bash_error.exit_code == 1 and bash_error.error and bash_error.error.message == "broke"
    assert bash_error.stdout == ""

    stdin = client.run_code(sandbox_id, "print(input()[::-1])", language="python", stdin="abc\n")
    assert stdin.stdout == "cba\n"


def test_printing_cannot_forge_a_result(client: Client, sandbox_id: str) -> None:
    forged = client.run_code(
        sandbox_id,
        'console.log(JSON.stringify({value: "forged"})); console.error("{\\"result\\": 1}")',
        language="javascript",
    )
    assert forged.result is None and forged.error is None and forged.exit_code == 0


def test_program_from_a_file_timeouts_and_history(
    client: Client, api: httpx.Client, sandbox_id: str
) -> None:
    client.write_file(sandbox_id, "app/main.ts", b'import { x } from "./lib.ts";\nresult.set(x);\n')
    client.write_file(sandbox_id, "app/lib.ts", b"export const x: string = 'imported';\n")
    from_file = client.run_code(sandbox_id, path="app/main.ts", language="typescript")
    assert from_file.result == "imported", from_file
    slow = client.run_code(sandbox_id, "while (true) {}", language="javascript", timeout_ms=1500)
    assert slow.status.value == "timed_out" and slow.error and slow.error.name == "TimeoutError"
    history = {c.id for c in client.list_commands(sandbox_id)}
    assert {from_file.command_id, slow.command_id} <= history
    with pytest.raises(ValidationError):
        client.run_code(sandbox_id, "1", path="x.ts", language="typescript")
    with pytest.raises(ValidationError):
        client.run_code(sandbox_id, "1", language="cobol")
    # Nothing of the run is left in /tmp.
    left = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"command": "ls -A /tmp"}).json()
    assert ".corral-run" not in left["stdout"]
