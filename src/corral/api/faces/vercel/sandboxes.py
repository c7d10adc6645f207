"""Sandboxes and their sessions: create (v2 and v3), get with `resume`, list, delete, fork,
stop, extend-timeout, network-policy, and snapshots."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Query, Request

from corral.api.auth import get_services
from corral.api.faces.vercel.wire import (
    DEFAULT_TIMEOUT_MS,
    FACE_LABEL,
    MEMORY_PER_VCPU,
    CreateSandbox,
    CreateSnapshot,
    ExtendTimeout,
    NetworkPolicy,
    SnapshotGone,
    Unsupported,
    UpdateSandbox,
    caller,
    corral_network,
    live_sandbox,
    pagination,
    router,
    sandbox_json,
    session_json,
    session_row,
    snapshot_json,
)
from corral.core.errors import NotFound, PermissionDenied
from corral.core.models import PortExpose, SandboxCreate, SandboxUpdate, Scope, SnapshotCreate
from corral.core.ports import host_label
from corral.core.tokens import Principal
from corral.services import Services
from corral.store.tables import SandboxRow

Caller = Depends(caller)
ServicesDep = Depends(get_services)


def _create_request(body: CreateSandbox, *, fork: bool = False) -> SandboxCreate:
    """The core's create request for a Vercel body. A fork sets only what its body gives (the
    rest comes from its source)."""
    fields: dict[str, Any] = {}
    if body.name is not None:
        fields["name"] = body.name
    if body.env is not None:
        fields["env"] = body.env
    fields["labels"] = {**(body.tags or {}), FACE_LABEL: "vercel"}
    resources = body.resources
    if resources is not None and resources.vcpus is not None:
        fields["cpu"] = resources.vcpus
        fields["memory_mb"] = resources.memory or int(resources.vcpus * MEMORY_PER_VCPU)
    elif resources is not None and resources.memory is not None:
        fields["memory_mb"] = resources.memory
    if body.timeout is not None or not fork:
        fields["ttl_seconds"] = max(1, (body.timeout or DEFAULT_TIMEOUT_MS) // 1000)
    if body.networkPolicy is not None:
        fields["network"], fields["allow"] = corral_network(body.networkPolicy)
    if body.network is not None:
        fields["network"] = body.network
    if body.allow is not None:
        fields["allow"] = body.allow
    if body.image is not None:
        fields["image"] = body.image
    if body.source is not None:
        if fork or body.source.type != "snapshot" or not body.source.snapshotId:
            raise Unsupported(
                f"source type {body.source.type!r} is not supported: only a snapshot "
                "(`{type: 'snapshot', snapshotId}`)"
            )
        fields["snapshot"] = body.source.snapshotId
    return SandboxCreate(**fields)


async def _routes(services: Services, request: Request, sandbox_id: str) -> list[dict[str, Any]]:
    """The sandbox's exposed ports, as Vercel's routes: the host form's URL when the server has a
    public domain, the path form's otherwise."""
    routes = []
    for port in await services.ports.list(sandbox_id):
        url = port.host_url or str(request.base_url).rstrip("/") + port.url
        subdomain = f"{port.port}-{host_label(sandbox_id)}"
        routes.append({"port": port.port, "subdomain": subdomain, "url": url.rstrip("/")})
    return routes


async def _expose(services: Services, row: SandboxRow, ports: list[int] | None) -> None:
    """Vercel's ports are served to anyone with the URL: exposed `public`."""
    for port in ports or ():
        await services.ports.expose(row, PortExpose(port=port, public=True))


async def _both(
    services: Services, request: Request, row: SandboxRow, *, resumed: bool | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"sandbox": sandbox_json(row), "session": session_json(row)}
    out["routes"] = await _routes(services, request, row.id)
    if resumed is not None:
        out["resumed"] = resumed
    return out


async def _create(
    services: Services, request: Request, principal: Principal, body: CreateSandbox
) -> Any:
    principal.require(Scope.sandboxes)
    if principal.sandbox_ids is not None:
        raise PermissionDenied("a token limited to certain sandboxes cannot create sandboxes")
    req = _create_request(body)
    if req.snapshot is not None:
        try:
            await services.snapshots.get(req.snapshot)
        except NotFound:
            raise SnapshotGone(f"no snapshot {req.snapshot!r}") from None
    created = await services.sandboxes.create(req)
    row = await services.sandboxes.row(created.id)
    await _expose(services, row, body.ports)
    return await _both(services, request, row)


@router.post("/v3/sandboxes", summary="Create a sandbox and its session")
async def create_sandbox_v3(
    body: CreateSandbox,
    request: Request,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    return await _create(services, request, principal, body)


@router.post("/v2/sandboxes", summary="Create a sandbox and its session (with a runtime)")
async def create_sandbox(
    body: CreateSandbox,
    request: Request,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    return await _create(services, request, principal, body)


@router.get("/v2/sandboxes", summary="Sandboxes, a page at a time (oldest first)")
async def list_sandboxes(
    limit: int = Query(50, ge=1, le=200),
    cursor: str | None = Query(None),
    namePrefix: str | None = Query(None, max_length=64),
    tags: list[str] | None = Query(None, description="key:value (one)"),
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.read)
    page = await services.sandboxes.list(
        only=principal.sandbox_ids, name_prefix=namePrefix, limit=limit, cursor=cursor
    )
    rows = [await services.sandboxes.row(item.id) for item in page.items]
    wanted = [tag.split(":", 1) for tag in tags or () if ":" in tag]
    rows = [r for r in rows if all(r.spec.get("labels", {}).get(k) == v for k, v in wanted)]
    sandboxes = [sandbox_json(r) for r in rows]
    return {"sandboxes": sandboxes, "pagination": pagination(len(sandboxes), page.next_cursor)}


# --- sessions (declared before /v2/sandboxes/{name}, which would match them) -------------------


@router.get("/v2/sandboxes/sessions", summary="Sessions: one per sandbox")
async def list_sessions(
    name: str | None = Query(None, description="The sandbox's"),
    limit: int = Query(50, ge=1, le=200),
    cursor: str | None = Query(None),
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.read)
    if name is not None:
        row = await live_sandbox(services, principal, name)
        return {"sessions": [session_json(row)], "pagination": pagination(1, None)}
    page = await services.sandboxes.list(only=principal.sandbox_ids, limit=limit, cursor=cursor)
    sessions = [session_json(await services.sandboxes.row(item.id)) for item in page.items]
    return {"sessions": sessions, "pagination": pagination(len(sessions), page.next_cursor)}


@router.get("/v2/sandboxes/sessions/{session_id}", summary="A session and its routes")
async def get_session(
    session_id: str,
    request: Request,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.read)
    row = await live_sandbox(services, principal, session_id)
    return {"session": session_json(row), "routes": await _routes(services, request, row.id)}


@router.post("/v2/sandboxes/sessions/{session_id}/stop", summary="Stop a session")
async def stop_session(
    session_id: str, services: Services = ServicesDep, principal: Principal = Caller
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await live_sandbox(services, principal, session_id)
    await services.sandboxes.stop(row.id)
    row = await services.sandboxes.row(row.id)
    return {"session": session_json(row), "sandbox": sandbox_json(row)}


@router.post("/v2/sandboxes/sessions/{session_id}/extend-timeout", summary="Extend a session")
async def extend_timeout(
    session_id: str,
    body: ExtendTimeout,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await session_row(services, principal, session_id)
    seconds = max(1, round(body.duration / 1000))
    await services.sandboxes.extend(row.id, seconds)
    return {"session": session_json(await services.sandboxes.row(row.id))}


@router.post(
    "/v2/sandboxes/sessions/{session_id}/network-policy", summary="Change the network policy"
)
async def update_network_policy(
    session_id: str,
    body: NetworkPolicy,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await session_row(services, principal, session_id)
    network, allow = corral_network(body)
    await services.sandboxes.update(row.id, SandboxUpdate(network=network, allow=allow))
    return {"session": session_json(await services.sandboxes.row(row.id))}


@router.post("/v2/sandboxes/sessions/{session_id}/snapshot", summary="Snapshot, then stop")
async def snapshot_session(
    session_id: str,
    body: CreateSnapshot | None = None,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await session_row(services, principal, session_id)
    expiration = body.expiration if body is not None else None
    seconds = max(1, round(expiration / 1000)) if expiration else None
    snapshot = await services.snapshots.create(row.id, SnapshotCreate(expires_in=seconds))
    # As on Vercel, the session stops once it is captured; the SDK resumes it when needed.
    await services.sandboxes.stop(row.id)
    return {
        "snapshot": snapshot_json(snapshot),
        "session": session_json(await services.sandboxes.row(row.id)),
    }


# --- snapshots ---------------------------------------------------------------------------------


def _no_snapshots(principal: Principal) -> None:
    if principal.sandbox_ids is not None:
        raise PermissionDenied("a token limited to certain sandboxes has no snapshots")


@router.get("/v2/sandboxes/snapshots", summary="Snapshots, of one sandbox if named")
async def list_snapshots(
    name: str | None = Query(None, description="The sandbox's"),
    limit: int = Query(50, ge=1, le=200),
    cursor: str | None = Query(None),
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.read)
    _no_snapshots(principal)
    source = None if name is None else (await live_sandbox(services, principal, name)).id
    page = await services.snapshots.list(sandbox=source, limit=limit, cursor=cursor)
    snapshots = [snapshot_json(s) for s in page.items]
    return {"snapshots": snapshots, "pagination": pagination(len(snapshots), page.next_cursor)}


@router.get("/v2/sandboxes/snapshots/{snapshot_id}", summary="A snapshot")
async def get_snapshot(
    snapshot_id: str, services: Services = ServicesDep, principal: Principal = Caller
) -> dict[str, Any]:
    principal.require(Scope.read)
    _no_snapshots(principal)
    return {"snapshot": snapshot_json(await services.snapshots.get(snapshot_id))}


@router.delete("/v2/sandboxes/snapshots/{snapshot_id}", summary="Delete a snapshot")
async def delete_snapshot(
    snapshot_id: str, services: Services = ServicesDep, principal: Principal = Caller
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    _no_snapshots(principal)
    snapshot = await services.snapshots.get(snapshot_id)
    await services.snapshots.delete(snapshot.id)
    return {"snapshot": snapshot_json(snapshot) | {"status": "deleted"}}


# --- one sandbox -------------------------------------------------------------------------------


@router.get("/v2/sandboxes/{name}", summary="A sandbox and its session; `resume` starts it")
async def get_sandbox(
    name: str,
    request: Request,
    resume: bool = Query(False, description="Start the sandbox if it is stopped"),
    projectId: str | None = Query(None, description="Accepted and ignored"),
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.read)
    row = await live_sandbox(services, principal, name)
    resumed = False
    if resume and row.state in ("stopped", "error", "paused"):
        principal.require(Scope.sandboxes)
        if row.state == "paused":  # paused through another API: thawed, not restarted
            await services.sandboxes.resume(row.id)
        else:
            await services.sandboxes.start(row.id, renew=True)
        row, resumed = await services.sandboxes.row(row.id), True
    return await _both(services, request, row, resumed=resumed)


@router.patch("/v2/sandboxes/{name}", summary="Change a sandbox (its timeout and network)")
async def update_sandbox(
    name: str,
    body: UpdateSandbox,
    request: Request,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await live_sandbox(services, principal, name)
    fixed = [
        key
        for key in ("tags", "resources", "mounts", "region", "currentSnapshotId")
        if getattr(body, key) is not None
    ]
    if fixed:
        raise Unsupported(f"a sandbox's {', '.join(fixed)} cannot be changed here")
    if body.networkPolicy is not None:
        corral_network(body.networkPolicy)  # refused now if it cannot be applied later
    if body.ports is not None:  # the sandbox's ports become those listed
        listed = set(body.ports)
        for port in await services.ports.list(row.id):
            if port.port not in listed:
                await services.ports.remove(row.id, port.port)
        await _expose(services, row, body.ports)
    # The timeout and the network policy take effect through the session's own routes, which
    # the SDK calls next (Corral keeps one lifetime and one policy per sandbox).
    return {"sandbox": sandbox_json(row), "routes": await _routes(services, request, row.id)}


@router.delete("/v2/sandboxes/{name}", summary="Delete a sandbox")
async def delete_sandbox(
    name: str, services: Services = ServicesDep, principal: Principal = Caller
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await live_sandbox(services, principal, name)
    await services.sandboxes.delete(row.id)
    return {"sandbox": sandbox_json(await services.sandboxes.row(row.id)), "routes": []}


@router.post("/v2/sandboxes/{name}/fork", summary="A new sandbox from this one's files")
async def fork_sandbox(
    name: str,
    request: Request,
    body: CreateSandbox | None = None,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    if principal.sandbox_ids is not None:
        raise PermissionDenied("a token limited to certain sandboxes cannot create sandboxes")
    source = await live_sandbox(services, principal, name)
    req = _create_request(body or CreateSandbox(), fork=True)
    # Vercel's fork copies its source's timeout and tags too (Corral's keeps them its own).
    inherited: dict[str, Any] = {
        "labels": {**source.spec.get("labels", {}), **req.labels},
    }
    if "ttl_seconds" not in req.model_fields_set:
        inherited["ttl_seconds"] = source.spec.get("ttl_seconds") or DEFAULT_TIMEOUT_MS // 1000
    req = req.model_copy(update=inherited)
    stopped = source.state in ("stopped", "error")
    if stopped:  # Corral captures a running sandbox: start it for the capture only
        await services.sandboxes.start(source.id)
    try:
        created = await services.snapshots.fork(source.id, req)
    finally:
        if stopped:
            await services.sandboxes.stop(source.id)
    row = await services.sandboxes.row(created.id)
    await _expose(services, row, body.ports if body is not None else None)
    return await _both(services, request, row)


@router.post("/v2/sandboxes/{name}/stop", summary="Stop a sandbox")
async def stop_sandbox(
    name: str, services: Services = ServicesDep, principal: Principal = Caller
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    row = await live_sandbox(services, principal, name)
    await services.sandboxes.stop(row.id)
    row = await services.sandboxes.row(row.id)
    return {"sandbox": sandbox_json(row), "session": session_json(row)}
