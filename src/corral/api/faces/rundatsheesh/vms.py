"""run-dat-sheesh's auth, VMs, exec, code runs and tar.gz transfers (the face's docstring, in
`__init__.py`, says where Corral differs)."""

from __future__ import annotations

import hmac
import zlib
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
from corral.core.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    Unauthenticated,
)
from corral.core.logins import login_keys
from corral.core.models import (
    MIN_DISK_MB,
    NAME_PATTERN,
    Command,
    CommandStatus,
    Cpus,
    DiskMb,
    ExecRequest,
    ImageRef,
    Language,
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
# run-dat-sheesh's upload limits (the server's own apply when lower).
MAX_UPLOAD_BYTES = 10 << 20
MAX_EXPANDED_BYTES = 50 << 20
MAX_ENTRIES = 10_000
GZIP_MAGIC = b"\x1f\x8b"
INFLATE_STEP = 1 << 16  # inflated bytes held at once while checking an upload


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
    imageId: ImageRef | None = Field(default=None, description="A Corral image (id or reference)")
    snapshotId: Annotated[str, Field(pattern=NAME_PATTERN)] | None = Field(
        default=None, description="A snapshot (id or name) to start from"
    )


class ExecBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    cmd: str = Field(min_length=1)
    cwd: str = "/workspace"
    env: dict[str, str] = Field(default_factory=dict)
    timeoutMs: Milliseconds = DEFAULT_TIMEOUT_MS


class RunCode(BaseModel):
    """`run-ts` and `run-js`; `denoFlags` and `nodeFlags` are taken and ignored (Deno's
    permissions are Corral's)."""

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
        # Corral gives out no sandbox addresses: nothing may connect into a sandbox.
        "guestIp": None,
        "provisionMode": "snapshot" if sandbox.snapshot else "boot",
        "snapshotId": sandbox.snapshot,
        "imageId": sandbox.image_id,
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
            image=body.imageId,
            snapshot=body.snapshotId,
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
    row = await usable_sandbox(services, principal, vm_id)
    if row.state == SandboxState.deleted.value:
        raise NotFound(f"VM {vm_id} not found")  # as run-dat-sheesh: a deleted VM is gone
    return vm_json(row)


@router.delete("/v1/vms/{vm_id}", status_code=204, summary="Delete a VM")
async def delete_vm(
    vm_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> Response:
    principal.require(Scope.sandboxes)
    row = await usable_sandbox(services, principal, vm_id)
    await services.sandboxes.delete(row.id)
    return Response(status_code=204)


@router.post("/v1/vms/{vm_id}/start", status_code=204, summary="Start a stopped VM")
async def start_vm(
    vm_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> Response:
    principal.require(Scope.sandboxes)
    row = await usable_sandbox(services, principal, vm_id)
    await services.sandboxes.start(row.id)
    return Response(status_code=204)


@router.post("/v1/vms/{vm_id}/stop", status_code=204, summary="Stop a VM (its files stay)")
async def stop_vm(
    vm_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> Response:
    principal.require(Scope.sandboxes)
    row = await usable_sandbox(services, principal, vm_id)
    await services.sandboxes.stop(row.id)
    return Response(status_code=204)


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


async def _run_code(
    services: Services, principal: Principal, vm_id: str, body: RunCode, language: Language
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
        language=language,
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
        # `result.error(value)` with a value that is not an Error: that value, as given.
        given = run.error.value
        out["error"] = given if given is not None else run.error.model_dump(exclude_none=True)
    return out


@router.post(
    "/v1/vms/{vm_id}/run-ts",
    summary="Run TypeScript with Deno; `result.set(value)` and `result.error(err)` give a value",
)
async def run_ts(
    vm_id: str,
    body: RunCode,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    return await _run_code(services, principal, vm_id, body, "typescript")


@router.post(
    "/v1/vms/{vm_id}/run-js",
    summary="Run JavaScript (on Deno, as run-ts); `result.set` and `result.error` as in run-ts",
)
async def run_js(
    vm_id: str,
    body: RunCode,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    return await _run_code(services, principal, vm_id, body, "javascript")


def _check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the upload exceeds {limit} bytes")


class GzipCheck:
    """Inflates a gzip stream fed in pieces, to check it, keeping none of its output: the
    inflated bytes are counted against `max_expanded`, INFLATE_STEP at a time."""

    def __init__(self, max_expanded: int) -> None:
        self.max_expanded = max_expanded
        self.expanded = 0
        self.inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only

    def feed(self, data: bytes) -> None:
        try:
            while data or (self.inflate.eof and self.inflate.unused_data):
                if self.inflate.eof:  # the next member of a multi-member stream
                    data = self.inflate.unused_data + data
                    self.inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                self.expanded += len(self.inflate.decompress(data, INFLATE_STEP))
                data = self.inflate.unconsumed_tail
                if self.expanded > self.max_expanded:
                    raise PayloadTooLarge(f"the archive expands to over {self.max_expanded} bytes")
        except zlib.error as exc:
            raise BadRequest(f"the body is not valid gzip: {exc}") from None

    def finish(self) -> None:
        self.feed(b"")
        if not self.inflate.eof:
            raise BadRequest("the gzip stream ends early")


async def _gzip_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body as it arrives, checked on its way to the sandbox: at most `limit` bytes, gzip
    by its magic, and inflating cleanly to its end."""
    check = GzipCheck(MAX_EXPANDED_BYTES)
    head: bytes | None = b""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"the upload exceeds {limit} bytes")
        if head is not None:
            head += chunk
            if len(head) < len(GZIP_MAGIC):
                continue
            if not head.startswith(GZIP_MAGIC):
                raise BadRequest("the body is not gzip (a tar.gz archive is expected)")
            chunk, head = head, None
        check.feed(chunk)
        yield chunk
    if head is not None:
        raise BadRequest("the body is not gzip (a tar.gz archive is expected)")
    check.finish()


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
    limit = min(MAX_UPLOAD_BYTES, services.settings.max_upload_bytes)
    _check_length(request, limit)
    await services.files.upload_archive(
        row.id,
        vm_path(dest),
        _gzip_body(request, limit),
        max_bytes=limit,
        max_expanded_bytes=MAX_EXPANDED_BYTES,
        max_entries=MAX_ENTRIES,
    )
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
