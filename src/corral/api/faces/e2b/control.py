"""The E2B control API under `/e2b`, as the `e2b` SDK calls it with `E2B_API_URL=<corral>/e2b`.

Auth is the SDK's `X-API-KEY` header (or `Authorization: Bearer`), carrying a Corral admin key or
token. Errors are E2B's `{"code": <HTTP status>, "message": "..."}`; validation errors are 400.

An E2B sandbox is a Corral sandbox (its id works in every face). Its `templateID` picks the
Corral template: `base` (the SDK's default) is Corral's default template `host`; any other id
must name a template of this server (404 otherwise). `timeout` (seconds, default 300, as
E2B's) is the sandbox's lifetime; at its end Corral stops it, and the E2B face then no longer
lists or finds it (E2B kills it). `envVars` is the env of every command, `metadata` is kept as
labels. `allow_internet_access: true` asks for Corral's `outbound` network; otherwise, unlike
E2B, a sandbox has no network. Pause freezes every process; connect (or resume) thaws it.

`envdAccessToken` is the sandbox's own secret, derived from the server's admin key and the
sandbox id, so that every replica checks it alike and connect can hand it out again; the SDK
sends it to the in-sandbox daemon face (`envd.py`) as `X-Access-Token`. It is given only to
callers whose token may run commands in the sandbox.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import parse_qsl, unquote

from fastapi import Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from corral.api.auth import get_services, usable_sandbox
from corral.api.faces._common import Problem, authenticate, face_router
from corral.clock import utcnow
from corral.core.errors import BadRequest, Conflict, NotFound, PermissionDenied
from corral.core.models import MAX_SECONDS, SandboxCreate, SandboxState, Scope, Seconds
from corral.core.tokens import Principal
from corral.services import Services
from corral.store.tables import SandboxRow

TAG = "E2B (control API)"
ENVD_VERSION = "0.5.7"  # the daemon protocol this face speaks (see envd.py)
CLIENT_ID = "corral"
DEFAULT_TEMPLATE = "base"
DEFAULT_TIMEOUT = 300  # seconds, as E2B's
TEMPLATE_LABEL = "e2b.template"
META_PREFIX = "e2b.meta."
LISTED = (SandboxState.running, SandboxState.paused, SandboxState.creating)


class E2BError(BaseModel):
    """E2B's error body."""

    code: int = Field(description="The HTTP status")
    message: str


def render(request: Request, problem: Problem) -> Response:
    status = 400 if problem.status == 422 else problem.status
    return JSONResponse({"code": status, "message": problem.message}, status_code=status)


router = face_router(TAG, render, error_model=E2BError, prefix="/e2b")


async def caller(request: Request) -> Principal:
    return await authenticate(request)


# --- wire shapes -------------------------------------------------------------------------------


class NewSandbox(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    template_id: str = Field(alias="templateID", min_length=1, max_length=200)
    timeout: Seconds | None = Field(default=None, description="Lifetime in seconds (300)")
    metadata: dict[str, str] = Field(default_factory=dict)
    env_vars: dict[str, str] = Field(default_factory=dict, alias="envVars")
    allow_internet_access: bool | None = None
    auto_pause: bool = Field(default=False, alias="autoPause", description="Accepted, ignored")


class Timeout(BaseModel):
    model_config = ConfigDict(extra="ignore")
    timeout: Annotated[int, Field(ge=0, le=MAX_SECONDS)]


class ConnectBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    timeout: Annotated[int, Field(ge=0, le=MAX_SECONDS)] | None = None


class Refresh(BaseModel):
    model_config = ConfigDict(extra="ignore")
    duration: Annotated[int, Field(ge=0, le=MAX_SECONDS)] | None = None


class CreatedSandbox(BaseModel):
    """What create, connect and resume answer (the SDK's `Sandbox`)."""

    templateID: str
    alias: str | None = None
    sandboxID: str
    clientID: str
    envdVersion: str
    envdAccessToken: str | None = None
    trafficAccessToken: str | None = None
    domain: str | None = None


class ListedSandbox(BaseModel):
    """A sandbox in a list (the SDK's `ListedSandbox`)."""

    templateID: str
    alias: str | None = None
    sandboxID: str
    clientID: str
    startedAt: str
    endAt: str
    cpuCount: int
    memoryMB: int
    diskSizeMB: int = Field(description="0: not limited")
    state: str = Field(description="running or paused")
    envdVersion: str
    metadata: dict[str, str] = Field(default_factory=dict)


class SandboxDetail(ListedSandbox):
    """One sandbox (the SDK's `SandboxDetail`)."""

    domain: str | None = None
    allowInternetAccess: bool | None = None
    envdAccessToken: str | None = Field(default=None, description="For tokens that may exec")


CONNECTED: dict[int | str, dict[str, Any]] = {
    200: {"model": CreatedSandbox, "description": "Running"},
    201: {"model": CreatedSandbox, "description": "Resumed"},
}


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def access_token(services: Services, sandbox_id: str) -> str:
    return "e2b_envd_" + services.tokens.derive("e2b-envd:" + sandbox_id)


def e2b_state(row: SandboxRow) -> str | None:
    """E2B's state of a Corral sandbox; None for one E2B would no longer know."""
    if row.state == SandboxState.paused.value:
        return "paused"
    if row.state in (SandboxState.running.value, SandboxState.creating.value):
        return "running"
    return None


def _memory_mb() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    except (ValueError, OSError):
        return 0


def listed_json(row: SandboxRow) -> dict[str, Any]:
    spec = row.spec
    labels = spec.get("labels") or {}
    template = labels.get(TEMPLATE_LABEL, row.template)
    end = row.expires_at or row.created_at + timedelta(seconds=MAX_SECONDS)
    return {
        "templateID": template,
        "alias": template,
        "sandboxID": row.id,
        "clientID": CLIENT_ID,
        "startedAt": iso(row.created_at),
        "endAt": iso(end),
        "cpuCount": max(1, round(spec.get("cpu") or os.cpu_count() or 1)),
        "memoryMB": spec.get("memory_mb") or _memory_mb(),
        "diskSizeMB": spec.get("disk_mb") or 0,
        "state": e2b_state(row) or "running",
        "envdVersion": ENVD_VERSION,
        "metadata": {
            k.removeprefix(META_PREFIX): v for k, v in labels.items() if k.startswith(META_PREFIX)
        },
    }


def detail_json(services: Services, row: SandboxRow, principal: Principal) -> dict[str, Any]:
    out = listed_json(row)
    out["domain"] = None
    out["allowInternetAccess"] = row.spec.get("network", "none") != "none"
    if _may_exec(principal):
        out["envdAccessToken"] = access_token(services, row.id)
    return out


def created_json(services: Services, row: SandboxRow) -> dict[str, Any]:
    labels = row.spec.get("labels") or {}
    template = labels.get(TEMPLATE_LABEL, row.template)
    return {
        "templateID": template,
        "alias": template,
        "sandboxID": row.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": access_token(services, row.id),
        "trafficAccessToken": None,
        "domain": None,
    }


def _may_exec(principal: Principal) -> bool:
    return principal.is_admin or Scope.exec in principal.scopes


async def known_sandbox(services: Services, principal: Principal, sandbox_id: str) -> SandboxRow:
    """A sandbox E2B would still know (running or paused), else 404 in E2B's words."""
    try:
        row = await usable_sandbox(services, principal, sandbox_id)
    except NotFound:
        raise NotFound(f"sandbox {sandbox_id!r} not found") from None
    if e2b_state(row) is None:
        raise NotFound(f"sandbox {sandbox_id!r} not found ({row.state})")
    return row


async def corral_template(services: Services, template_id: str) -> str:
    templates = await services.sandboxes.templates()
    if template_id == DEFAULT_TEMPLATE and "host" in templates:
        return "host"
    if template_id in templates:
        return template_id
    raise NotFound(
        f"template {template_id!r} not found; this server has "
        + ", ".join([f"{DEFAULT_TEMPLATE} (host)", *(t for t in templates if t != "host")])
    )


# --- sandboxes ---------------------------------------------------------------------------------


async def _create(body: NewSandbox, services: Services, principal: Principal) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    if principal.sandbox_ids is not None:
        raise PermissionDenied("a token limited to certain sandboxes cannot create sandboxes")
    template = await corral_template(services, body.template_id)
    labels = {"face": "e2b", TEMPLATE_LABEL: body.template_id}
    labels.update({META_PREFIX + k: v for k, v in body.metadata.items()})
    created = await services.sandboxes.create(
        SandboxCreate(
            template=template,
            env=body.env_vars,
            labels=labels,
            ttl_seconds=body.timeout or DEFAULT_TIMEOUT,
            network="outbound" if body.allow_internet_access else "none",
        )
    )
    return created_json(services, await services.sandboxes.row(created.id))


@router.post(
    "/sandboxes", status_code=201, response_model=CreatedSandbox, summary="Create a sandbox"
)
async def create_sandbox(
    body: NewSandbox,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    return await _create(body, services, principal)


@router.post(
    "/v2/sandboxes",
    status_code=201,
    response_model=CreatedSandbox,
    summary="Create a sandbox (v2)",
)
async def create_sandbox_v2(
    body: NewSandbox,
    idempotency_key: str | None = Header(None, description="Accepted, ignored"),
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    return await _create(body, services, principal)


def _states(state: str | None) -> set[str]:
    if not state:
        return {"running", "paused"}
    states = {s.strip() for s in state.split(",") if s.strip()}
    unknown = states - {"running", "paused"}
    if unknown:
        raise BadRequest(f"unknown state {sorted(unknown)[0]!r}: running or paused")
    return states


@router.get(
    "/v2/sandboxes",
    response_model=list[ListedSandbox],
    summary="List sandboxes (v2): by state, metadata; paged (X-Next-Token)",
)
async def list_sandboxes_v2(
    response: Response,
    state: str | None = Query(None, description="running, paused or both (comma-separated)"),
    metadata: str | None = Query(None, description="URL-encoded key=value pairs"),
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    next_token: str | None = Query(None, alias="nextToken"),
    template: str | None = Query(None, description="Only sandboxes of this template id"),
    started_after: datetime | None = Query(None, alias="startedAfter"),
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> list[dict[str, Any]]:
    principal.require(Scope.read)
    wanted = _states(state)
    # The SDK quotes each key and value before it encodes the pairs.
    wanted_meta = {
        unquote(k): unquote(v) for k, v in parse_qsl(metadata or "", keep_blank_values=True)
    }
    page = await services.sandboxes.list(
        only=principal.sandbox_ids, limit=limit, cursor=next_token or None
    )
    out = []
    for sandbox in page.items:
        row = await services.sandboxes.row(sandbox.id)
        listed = listed_json(row)
        if e2b_state(row) not in wanted:
            continue
        if any(listed["metadata"].get(k) != v for k, v in wanted_meta.items()):
            continue
        if template and listed["templateID"] != template:
            continue
        if started_after is not None and row.created_at < _aware(started_after):
            continue
        out.append(listed)
    if page.next_cursor:
        response.headers["X-Next-Token"] = page.next_cursor
    return out


@router.get("/sandboxes", response_model=list[ListedSandbox], summary="List running sandboxes (v1)")
async def list_sandboxes(
    response: Response,
    metadata: str | None = Query(None),
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> list[dict[str, Any]]:
    return await list_sandboxes_v2(
        response,
        "running",
        metadata,
        1000,
        None,
        None,
        None,
        services=services,
        principal=principal,
    )


@router.get("/sandboxes/{sandbox_id}", response_model=SandboxDetail, summary="A sandbox")
async def get_sandbox(
    sandbox_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    row = await known_sandbox(services, principal, sandbox_id)
    return detail_json(services, row, principal)


@router.delete("/sandboxes/{sandbox_id}", status_code=204, summary="Kill a sandbox")
async def kill_sandbox(
    sandbox_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> Response:
    principal.require(Scope.sandboxes)
    row = await known_sandbox(services, principal, sandbox_id)
    await services.sandboxes.delete(row.id)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204, summary="Set the timeout")
async def set_timeout(
    sandbox_id: str,
    body: Timeout,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> Response:
    principal.require(Scope.sandboxes)
    row = await known_sandbox(services, principal, sandbox_id)
    await services.sandboxes.set_deadline(row.id, max(1, body.timeout))
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204, summary="Keep alive")
async def refresh(
    sandbox_id: str,
    body: Refresh | None = None,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> Response:
    principal.require(Scope.sandboxes)
    row = await known_sandbox(services, principal, sandbox_id)
    duration = (body.duration if body else None) or DEFAULT_TIMEOUT
    await services.sandboxes.set_deadline(row.id, max(1, duration))
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204, summary="Pause a sandbox")
async def pause_sandbox(
    sandbox_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> Response:
    principal.require(Scope.sandboxes)
    row = await known_sandbox(services, principal, sandbox_id)
    if row.state == SandboxState.paused.value:
        raise Conflict(f"sandbox {row.id} is already paused")
    await services.sandboxes.pause(row.id)
    return Response(status_code=204)


async def _connect(
    sandbox_id: str,
    timeout: int | None,
    services: Services,
    principal: Principal,
    *,
    must_be_paused: bool = False,
) -> JSONResponse:
    principal.require(Scope.exec)
    row = await known_sandbox(services, principal, sandbox_id)
    status = 200
    if row.state == SandboxState.paused.value:
        principal.require(Scope.sandboxes)
        await services.sandboxes.resume(row.id)
        status = 201
    elif must_be_paused:
        raise Conflict(f"sandbox {row.id} is already running")
    if timeout:
        # E2B lengthens a running sandbox's timeout only: never shortens it here.
        end = (await services.sandboxes.row(row.id)).expires_at
        if end is None or status == 201 or (end - utcnow()).total_seconds() < timeout:
            await services.sandboxes.set_deadline(row.id, timeout)
    return JSONResponse(
        created_json(services, await services.sandboxes.row(row.id)), status_code=status
    )


@router.post(
    "/sandboxes/{sandbox_id}/connect",
    responses=CONNECTED,
    summary="Connect (201: resumed from paused)",
)
async def connect_sandbox(
    sandbox_id: str,
    body: ConnectBody | None = None,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> JSONResponse:
    return await _connect(sandbox_id, body.timeout if body else None, services, principal)


@router.post(
    "/v2/sandboxes/{sandbox_id}/connect",
    responses=CONNECTED,
    summary="Connect (v2; 201: resumed from paused)",
)
async def connect_sandbox_v2(
    sandbox_id: str,
    body: ConnectBody | None = None,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> JSONResponse:
    return await _connect(sandbox_id, body.timeout if body else None, services, principal)


@router.post(
    "/sandboxes/{sandbox_id}/resume",
    status_code=201,
    responses={201: {"model": CreatedSandbox}},
    summary="Resume a paused sandbox",
)
async def resume_sandbox(
    sandbox_id: str,
    body: ConnectBody | None = None,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> JSONResponse:
    return await _connect(
        sandbox_id, body.timeout if body else None, services, principal, must_be_paused=True
    )
