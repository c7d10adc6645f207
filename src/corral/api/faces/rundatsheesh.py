"""The run-dat-sheesh API (seed 002), over Corral's core.

A VM is a Corral sandbox: `:id` takes its id or its name. `/v1/*` takes `X-API-Key` (any Corral
token; every other style Corral accepts works too) or the admin session cookie from
`POST /auth/login`; `/docs/*`, `/swagger` and `/openapi.json` are public. Errors are
`{"message": "..."}`.

Where Corral differs from run-dat-sheesh:
- The admin login is the operator's `CORRAL_ADMIN_EMAIL` and `CORRAL_ADMIN_PASSWORD`; a login
  makes a Corral token with every scope (named `rds-login:<email>`, valid 24 hours) and sets it
  as the `rds_session` cookie (HttpOnly, SameSite=Strict, Secure when the server is reached
  over TLS); logout revokes it. Failed logins are throttled per client address and per account
  (`corral.core.logins`: 5 free, then a wait from 1 s doubling to 5 minutes; 429 with
  `Retry-After`).
- A request the cookie authenticates that changes something (any method but GET, HEAD and
  OPTIONS), and login and logout, must come from this server's own pages: `Sec-Fetch-Site`
  same-origin or none, else an `Origin` naming this host, else neither header (no browser);
  otherwise 403 (`corral.api.origin`). Key-authenticated requests need no such check.
- `GET /auth/me` reports the caller (cookie, or key): `role` `admin` for a token with every
  scope, else `user`, with its `scopes` and `sandboxIds` (null: every sandbox).
- `outboundInternet: true` is Corral's `outbound` network (public addresses; private ranges,
  denied unless listed in `allowIps`, the host and link-local always); `allowIps` alone is the
  `allow` network (only those IPv4 CIDRs); neither is no network at all.
- States: CREATED is never seen (a VM is RUNNING when the create answers); a paused sandbox is
  STOPPED. `exec` runs bash with `cmd` in /workspace as uid 1000; its default timeout is 30 s,
  the most 120 s (a 400 above); on timeout every process of the command is killed and the
  answer is `exitCode: -1` with the output so far and stderr ending in `Timeout exceeded`.
- Paths under /home/user (the VM user's home in run-dat-sheesh, as in the seed's upload example)
  are taken under /workspace, the sandbox user's home. `files/upload` extracts the tar.gz inside
  the sandbox as its user (links leading out and `..` refused: 400); its limits are the
  server's (`CORRAL_MAX_UPLOAD_BYTES`, 413; `CORRAL_MAX_UPLOAD_EXPANDED_BYTES`,
  `CORRAL_MAX_UPLOAD_ENTRIES`), not the original's 10 MiB / 50 MiB / 10,000 entries.
- `run-ts` runs on Deno through Corral's code runs: `env` items are `KEY=value`; `error` is
  `{name, message, stack}` (a thrown Error's, or for `result.error(value)` with a non-Error
  value, its JSON text as `message`); a timeout answers `exitCode: -1` as `exec` does. `run-js`
  is not offered.
- `GET /v1/vms/:id/exec-logs` is the sandbox's whole command history (every face's commands),
  newest first, `?limit=` (default 50).
- Quota exceeded (the server's sandbox limit) is a 429, as is the per-token rate limit.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from corral.api.auth import get_services, running_sandbox, token_from_request, usable_sandbox
from corral.api.errors import STORAGE_FULL
from corral.api.faces._common import (
    Problem,
    authenticate,
    face_errors,
    face_router,
)
from corral.api.origin import SAFE_METHODS, check_same_origin
from corral.core.errors import BadRequest, PayloadTooLarge, PermissionDenied, Unauthenticated
from corral.core.logins import login_keys
from corral.core.models import (
    MIN_DISK_MB,
    Command,
    CommandStatus,
    Cpus,
    DiskMb,
    ExecRequest,
    MemoryMb,
    Milliseconds,
    RunRequest,
    Sandbox,
    SandboxCreate,
    SandboxPath,
    SandboxState,
    Scope,
    TokenCreate,
)
from corral.core.sandboxes import to_model as sandbox_model
from corral.core.tokens import Principal
from corral.services import Services
from corral.store.tables import SandboxRow

TAG = "run-dat-sheesh (seed 002)"
COOKIE = "rds_session"
SESSION_SECONDS = 24 * 3600
DEFAULT_TIMEOUT_MS = 30_000
MAX_TIMEOUT_MS = 120_000
STATES = {
    SandboxState.creating: "STARTING",
    SandboxState.running: "RUNNING",
    SandboxState.paused: "STOPPED",
    SandboxState.stopped: "STOPPED",
    SandboxState.error: "ERROR",
    SandboxState.deleted: "DELETED",
}
HOME = "/home/user"


class RdsError(BaseModel):
    """run-dat-sheesh's error body."""

    message: str


def render(request: Request, problem: Problem) -> Response:
    message = problem.message
    if problem.status == 401:
        message = "Unauthorized"
    return JSONResponse({"message": message}, status_code=problem.status)


router = face_router(TAG, render, error_model=RdsError)
STORAGE_ERRORS = face_errors(render, RdsError, statuses=STORAGE_FULL)


async def caller(request: Request) -> Principal:
    """`X-API-Key` (or any token style), else the admin session cookie: with the cookie, a
    request that changes something must come from this server's own pages."""
    if token_from_request(request) is None and request.cookies.get(COOKIE):
        if request.method not in SAFE_METHODS:
            check_same_origin(request)
        return await authenticate(request, request.cookies[COOKIE])
    return await authenticate(request)


def set_session_cookie(request: Request, response: Response, secret: str | None) -> None:
    """The session cookie, or its removal: never sent cross-site, out of reach of scripts, and
    over TLS only when served over TLS (the scheme the server itself sees: a proxy's
    X-Forwarded-Proto is not trusted)."""
    attributes: dict[str, Any] = {
        "path": "/",
        "httponly": True,
        "samesite": "strict",
        "secure": request.scope.get("scheme") == "https",
    }
    if secret is None:
        response.delete_cookie(COOKIE, **attributes)
    else:
        response.set_cookie(COOKIE, secret, max_age=SESSION_SECONDS, **attributes)


# --- wire shapes -------------------------------------------------------------------------------


class Login(BaseModel):
    email: str
    password: str


class CreateVM(BaseModel):
    model_config = ConfigDict(extra="ignore")
    cpu: Cpus | None = None
    memMb: MemoryMb | None = None
    allowIps: list[str] = Field(default_factory=list)
    outboundInternet: bool = False
    diskSizeMb: DiskMb | None = Field(default=None, description=f"At least {MIN_DISK_MB}")


class ExecBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    cmd: str = Field(min_length=1)
    cwd: str = "/workspace"
    env: dict[str, str] = Field(default_factory=dict)
    timeoutMs: Milliseconds = DEFAULT_TIMEOUT_MS


class RunTs(BaseModel):
    model_config = ConfigDict(extra="ignore")
    code: str | None = None
    path: str | None = None
    args: list[str] = Field(default_factory=list)
    env: list[str] = Field(default_factory=list, description='"KEY=value" items')
    timeoutMs: Milliseconds = DEFAULT_TIMEOUT_MS


def vm_path(path: str) -> str:
    """run-dat-sheesh's user home is /home/user; a Corral sandbox's is /workspace."""
    if path == HOME or path.startswith(HOME + "/"):
        return "/workspace" + path[len(HOME) :]
    return path


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def vm_json(found: SandboxRow | Sandbox) -> dict[str, Any]:
    sandbox = sandbox_model(found) if isinstance(found, SandboxRow) else found
    out: dict[str, Any] = {
        "id": sandbox.id,
        "name": sandbox.name,
        "state": STATES[sandbox.state],
        "cpu": sandbox.cpu,
        "memMb": sandbox.memory_mb,
        "diskSizeMb": sandbox.disk_mb,
        "outboundInternet": sandbox.network == "outbound",
        "allowIps": list(sandbox.allow),
        "createdAt": iso(sandbox.created_at),
        "updatedAt": iso(sandbox.updated_at),
    }
    if sandbox.error:
        out["error"] = sandbox.error
    return out


def exec_log_json(command: Command) -> dict[str, Any]:
    return {
        "id": command.id,
        "cmd": command.command
        if command.args is None
        else " ".join([command.command, *command.args]),
        "status": command.status.value,
        "exitCode": command.exit_code,
        "durationMs": command.duration_ms,
        "startedAt": iso(command.started_at or command.created_at),
        "finishedAt": iso(command.finished_at),
    }


# --- auth --------------------------------------------------------------------------------------


@router.post("/auth/login", summary="Admin login: sets the session cookie")
async def login(body: Login, request: Request) -> Response:
    check_same_origin(request)
    services = get_services(request)
    email, password = services.settings.admin_email, services.settings.admin_password

    def verify() -> bool:
        return (
            email is not None
            and password is not None
            and hmac.compare_digest(body.email.strip().lower().encode(), email.lower().encode())
            and hmac.compare_digest(body.password.encode(), password.encode())
        )

    address = request.client.host if request.client else None
    if not await services.logins.attempt(login_keys(address, body.email), verify):
        raise Unauthenticated("invalid email or password")
    token = await services.tokens.create(
        TokenCreate(
            name=f"rds-login:{email}", scopes=[Scope.admin], expires_in_seconds=SESSION_SECONDS
        )
    )
    response = JSONResponse({"ok": True, "email": email})
    set_session_cookie(request, response, token.secret)
    return response


@router.post("/auth/logout", summary="Ends the admin session")
async def logout(request: Request) -> Response:
    services = get_services(request)
    secret = request.cookies.get(COOKIE)
    if secret:
        check_same_origin(request)
        try:
            principal = await services.tokens.authenticate(secret)
        except Unauthenticated:
            principal = None
        if principal is not None and principal.token_id != "admin":
            await services.tokens.delete(principal.token_id)
    response = JSONResponse({"ok": True})
    set_session_cookie(request, response, None)
    return response


@router.get("/auth/me", summary="Who the caller is: the session cookie's (or key's) scopes")
async def me(request: Request) -> dict[str, Any]:
    principal = await caller(request)
    admin = principal.is_admin
    return {
        "email": get_services(request).settings.admin_email if admin else None,
        "role": "admin" if admin else "user",
        "scopes": sorted(scope.value for scope in principal.scopes),
        "sandboxIds": sorted(principal.sandbox_ids) if principal.sandbox_ids is not None else None,
    }


@router.get("/swagger", include_in_schema=False)
async def swagger() -> HTMLResponse:
    from corral.api.routes.system import STATIC

    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="Corral API",
        swagger_js_url=f"{STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{STATIC}/favicon-32x32.png",
    )


# --- VMs ---------------------------------------------------------------------------------------


@router.post("/v1/vms", status_code=201, summary="Create a VM")
async def create_vm(
    body: CreateVM,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    if principal.sandbox_ids is not None:
        raise PermissionDenied("a token limited to certain sandboxes cannot create VMs")
    network = "outbound" if body.outboundInternet else "allow" if body.allowIps else "none"
    created = await services.sandboxes.create(
        SandboxCreate(
            cpu=body.cpu,
            memory_mb=body.memMb,
            disk_mb=body.diskSizeMb,
            network=network,
            allow=body.allowIps,
            labels={"face": "rundatsheesh"},
        )
    )
    return vm_json(await services.sandboxes.row(created.id))


@router.get("/v1/vms", summary="List VMs")
async def list_vms(
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> list[dict[str, Any]]:
    principal.require(Scope.read)
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await services.sandboxes.list(only=principal.sandbox_ids, cursor=cursor, limit=500)
        for sandbox in page.items:
            items.append(vm_json(sandbox))
        cursor = page.next_cursor
        if cursor is None:
            return items


@router.get("/v1/vms/{vm_id}", summary="One VM")
async def get_vm(
    vm_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    return vm_json(await usable_sandbox(services, principal, vm_id))


@router.delete("/v1/vms/{vm_id}", summary="Delete a VM")
async def delete_vm(
    vm_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await usable_sandbox(services, principal, vm_id)
    await services.sandboxes.delete(row.id)
    return vm_json(await services.sandboxes.row(row.id))


@router.post("/v1/vms/{vm_id}/start", summary="Start a stopped VM")
async def start_vm(
    vm_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await usable_sandbox(services, principal, vm_id)
    await services.sandboxes.start(row.id)
    return vm_json(await services.sandboxes.row(row.id))


@router.post("/v1/vms/{vm_id}/stop", summary="Stop a VM (its files stay)")
async def stop_vm(
    vm_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await usable_sandbox(services, principal, vm_id)
    await services.sandboxes.stop(row.id)
    return vm_json(await services.sandboxes.row(row.id))


@router.post("/v1/vms/{vm_id}/exec", summary="Run a shell command as uid 1000 in /workspace")
async def exec_vm(
    vm_id: str,
    body: ExecBody,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.exec)
    if body.timeoutMs > MAX_TIMEOUT_MS:
        raise BadRequest(f"timeoutMs may be at most {MAX_TIMEOUT_MS}")
    req = ExecRequest(
        command=body.cmd, cwd=vm_path(body.cwd), env=body.env, timeout_ms=body.timeoutMs
    )
    row = await running_sandbox(services, principal, vm_id)
    command = await services.commands.run(row, req, source="rundatsheesh")
    stdout, stderr = command.stdout or "", command.stderr or ""
    if command.status is CommandStatus.timed_out:
        sep = "" if not stderr or stderr.endswith("\n") else "\n"
        return {"exitCode": -1, "stdout": stdout, "stderr": f"{stderr}{sep}Timeout exceeded"}
    if command.status in (CommandStatus.failed, CommandStatus.lost):
        sep = "" if not stderr or stderr.endswith("\n") else "\n"
        return {"exitCode": -1, "stdout": stdout, "stderr": f"{stderr}{sep}{command.error}"}
    exit_code = command.exit_code if command.exit_code is not None else 128 + (command.signal or 0)
    return {"exitCode": exit_code, "stdout": stdout, "stderr": stderr}


@router.get("/v1/vms/{vm_id}/exec-logs", summary="Past commands of the VM, newest first")
async def exec_logs(
    vm_id: str,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> list[dict[str, Any]]:
    principal.require(Scope.read)
    row = await usable_sandbox(services, principal, vm_id)
    page = await services.commands.list(row.id, limit=limit)
    return [exec_log_json(c) for c in page.items]


@router.post(
    "/v1/vms/{vm_id}/run-ts",
    summary="Run TypeScript with Deno; `result.set(value)` and `result.error(err)` give a value",
)
async def run_ts(
    vm_id: str,
    body: RunTs,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.exec)
    if body.timeoutMs > MAX_TIMEOUT_MS:
        raise BadRequest(f"timeoutMs may be at most {MAX_TIMEOUT_MS}")
    env: dict[str, str] = {}
    for item in body.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadRequest(f"env items are KEY=value, not {item!r}")
        env[key] = value
    req = RunRequest(
        language="typescript",
        code=body.code,
        path=vm_path(body.path) if body.path else None,
        args=body.args,
        env=env,
        timeout_ms=body.timeoutMs,
    )
    row = await running_sandbox(services, principal, vm_id)
    run = await services.runs.run(row, req)
    out: dict[str, Any] = {"exitCode": run.exit_code, "stdout": run.stdout, "stderr": run.stderr}
    if run.status is CommandStatus.timed_out:
        sep = "" if not run.stderr or run.stderr.endswith("\n") else "\n"
        out |= {"exitCode": -1, "stderr": f"{run.stderr}{sep}Timeout exceeded"}
    elif run.exit_code is None:
        out["exitCode"] = -1
    if run.result is not None:
        out["result"] = run.result
    if run.error is not None:
        out["error"] = run.error.model_dump(exclude_none=True)
    return out


def _check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the upload exceeds {limit} bytes")


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        yield chunk


@router.post(
    "/v1/vms/{vm_id}/files/upload",
    status_code=204,
    summary="Extract a tar.gz body into `dest`",
    responses=STORAGE_ERRORS,
    openapi_extra={
        "requestBody": {"content": {"application/gzip": {"schema": {"type": "string"}}}}
    },
)
async def upload(
    vm_id: str,
    request: Request,
    dest: Annotated[SandboxPath, Query(description="Directory to extract into")],
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> Response:
    principal.require(Scope.files)
    row = await running_sandbox(services, principal, vm_id)
    _check_length(request, services.settings.max_upload_bytes)
    await services.files.upload_archive(row.id, vm_path(dest), _body(request))
    return Response(status_code=204)


@router.get(
    "/v1/vms/{vm_id}/files/download",
    summary="A directory as a tar.gz stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/gzip": {}}}},
)
async def download(
    vm_id: str,
    path: Annotated[SandboxPath, Query(description="Directory to archive")],
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> StreamingResponse:
    principal.require(Scope.files)
    row = await running_sandbox(services, principal, vm_id)
    _, stream = await services.files.open_download(
        row.id, "archive", {"path": vm_path(path), "level": 6}
    )
    # The abort also runs when the client went away, so the helper never outlives it.
    return StreamingResponse(
        stream, media_type="application/gzip", background=BackgroundTask(stream.abort)
    )
