"""Code runs: a program in TypeScript, JavaScript, Python or bash, run in a sandbox with a
structured `result` beside its output. And the tools directory that every sandbox sees at
/opt/corral (the in-sandbox helpers, and Deno).

A run is an ordinary command (it is in the history, can be streamed, attached to, cancelled),
started through a launcher (`corral.core.tools.run`) that receives the code on its standard
input. The result travels through files in a private directory of the run, which the server
collects with the file helper once the command has ended; printing to stdout or stderr cannot
forge it. TypeScript and JavaScript both run on Deno (from the `deno` package on PyPI), with
permissions: files only under /workspace and /tmp (and /etc/resolv.conf and /etc/hosts to read),
environment only the given keys (the run's and the sandbox's) and TMPDIR, network only when the
sandbox's policy allows it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from corral.core.commands import CommandService
from corral.core.errors import CorralError, InvalidArgument, Unavailable
from corral.core.files import PYTHON, TOOLS_MOUNT, FileService
from corral.core.models import CommandStatus, ExecRequest, RunError, RunRequest, RunResult
from corral.node.remote import RemoteNode
from corral.store.tables import SandboxRow

log = logging.getLogger(__name__)

TOOLS_SOURCE = Path(__file__).with_name("tools")
TOOL_SCRIPTS = ("archive.py", "files.py", "run.py", "pyrun.py")
RUN_LAUNCHER = f"{TOOLS_MOUNT}/run.py"
RESULT_LIMIT = 8 << 20  # bytes of JSON a run's result may have


def find_deno() -> Path | None:
    """The deno binary of the `deno` package (or next to this Python, or on PATH)."""
    candidates: list[str | None] = []
    try:
        import deno

        candidates.append(deno.find_deno_bin())
    except (ImportError, FileNotFoundError):
        pass
    candidates.append(str(Path(sys.executable).with_name("deno")))
    candidates.append(shutil.which("deno"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return Path(candidate)
    return None


def _install(source: Path, target: Path, mode: int) -> None:
    """Copy a file in place atomically (running sandboxes see the directory live)."""
    try:
        st, tt = source.stat(), target.stat()
        if st.st_size == tt.st_size and int(st.st_mtime) == int(tt.st_mtime):
            target.chmod(mode)
            return
    except FileNotFoundError:
        pass
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        shutil.copy2(source, temp)
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def install_tools(tools_dir: Path) -> bool:
    """Fill the tools directory; returns whether Deno is available in sandboxes."""
    tools_dir.mkdir(parents=True, exist_ok=True)
    tools_dir.chmod(0o755)
    for name in TOOL_SCRIPTS:
        _install(TOOLS_SOURCE / name, tools_dir / name, 0o644)
    deno = find_deno()
    if deno is None:
        log.warning("deno not found: TypeScript and JavaScript code runs are unavailable")
        return False
    _install(deno, tools_dir / "deno", 0o755)
    return True


class RunService:
    def __init__(self, commands: CommandService, files: FileService, *, deno: bool) -> None:
        self.commands = commands
        self.files = files
        self.deno = deno

    async def run(self, sandbox: SandboxRow, req: RunRequest) -> RunResult:
        if (req.code is None) == (req.path is None):
            raise InvalidArgument(
                "give exactly one of code and path",
                details=[{"loc": ["body", "code"], "msg": "exactly one of code and path"}],
            )
        if req.language in ("typescript", "javascript") and not await self._has_deno(sandbox):
            raise Unavailable("Deno is not installed on this server: no TypeScript or JavaScript")
        directory = f"/tmp/.corral-run-{secrets.token_hex(16)}"
        code = (req.code or "").encode("utf-8")
        allowed = sorted(set(req.env) | set(sandbox.spec.get("env", {})))
        header = {
            "language": req.language,
            "dir": directory,
            "path": req.path,
            "code_bytes": len(code),
            "args": req.args,
            "env_keys": allowed,
            "net": sandbox.spec.get("network", "none") != "none",
        }
        stdin = json.dumps(header).encode() + b"\n" + code + (req.stdin or "").encode("utf-8")
        command = await self.commands.run(
            sandbox,
            ExecRequest(
                command=PYTHON,
                args=["-I", "-S", RUN_LAUNCHER, req.language],
                cwd=req.cwd,
                env=req.env,
                timeout_ms=req.timeout_ms,
                max_output_bytes=req.max_output_bytes,
            ),
            source="run",
            stdin=stdin,
        )
        taken = await self._take_result(sandbox.id, directory)
        error = taken.get("error")
        run_error = RunError(**error) if isinstance(error, dict) and "message" in error else None
        if run_error is None:
            run_error = _status_error(command.status, command.timeout_ms, command.error)
        return RunResult(
            command_id=command.id,
            sandbox_id=command.sandbox_id,
            language=req.language,
            status=command.status,
            exit_code=command.exit_code,
            signal=command.signal,
            stdout=command.stdout or "",
            stderr=command.stderr or "",
            stdout_truncated=command.stdout_truncated,
            stderr_truncated=command.stderr_truncated,
            result=taken.get("value"),
            error=run_error,
            duration_ms=command.duration_ms,
        )

    async def _has_deno(self, sandbox: SandboxRow) -> bool:
        """Whether the sandbox's node has Deno: this server's own node says so at start, an
        agent in what it registered with (a replica without a node of its own has none)."""
        node = await self.files.directory.for_sandbox(sandbox.id)
        return node.info.deno if isinstance(node, RemoteNode) else self.deno

    async def _take_result(self, sandbox_id: str, directory: str) -> dict[str, object]:
        try:
            return await self.files.call(
                sandbox_id, "take_result", {"dir": directory, "max_bytes": RESULT_LIMIT}
            )
        except CorralError as exc:
            log.warning("could not collect the result of a code run: %s", exc.message)
            return {"error": {"name": "ResultError", "message": f"no result: {exc.message}"}}


def _status_error(status: CommandStatus, timeout_ms: int, error: str | None) -> RunError | None:
    if status is CommandStatus.timed_out:
        return RunError(name="TimeoutError", message=f"the run timed out after {timeout_ms} ms")
    if status is CommandStatus.cancelled:
        return RunError(name="Cancelled", message="the run was cancelled")
    if status in (CommandStatus.failed, CommandStatus.lost):
        return RunError(name=status.value.capitalize(), message=error or status.value)
    return None
