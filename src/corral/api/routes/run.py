"""Code runs: `POST /v1/sandboxes/{id}/run`."""

from __future__ import annotations

from fastapi import APIRouter

from corral.api.auth import Caller, ServicesDep, running_sandbox
from corral.core.models import RunRequest, RunResult, Scope

router = APIRouter(prefix="/v1/sandboxes/{sandbox}", tags=["run"])


@router.post("/run", response_model=RunResult)
async def run_code(
    sandbox: str, body: RunRequest, services: ServicesDep, caller: Caller
) -> RunResult:
    """Run a program (`code`, or a file at `path` in the sandbox) in `language` and answer with
    its output, exit status and structured result.

    The program sets its result with `result.set(value)` (any JSON value) or reports an error
    with `result.error(err)` (exit status 1): in TypeScript and JavaScript (Deno) and Python
    `result` is a global; in bash `result.set JSON` and `result.error MESSAGE` (which exits 1).
    An uncaught error is reported as `error` too. TypeScript and JavaScript run on Deno with
    permissions: files only in /workspace and /tmp, environment only the keys of `env` and of the
    sandbox, network only when the sandbox has a network policy. A run is a command: it is in
    the history under `command_id`.
    """
    caller.require(Scope.exec)
    row = await running_sandbox(services, caller, sandbox)
    return await services.runs.run(row, body)
