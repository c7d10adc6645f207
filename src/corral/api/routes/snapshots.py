"""`/v1/snapshots`, and the sandbox calls that take one (`/v1/sandboxes/{id}/snapshots`,
`/v1/sandboxes/{id}/fork`): a running sandbox's files, captured on its node."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Query, Response

from corral.api.auth import Caller, ServicesDep, usable_sandbox
from corral.core.errors import NotFound, PermissionDenied
from corral.core.models import Page, Sandbox, SandboxCreate, Scope, Snapshot, SnapshotCreate
from corral.core.tokens import Principal

router = APIRouter(prefix="/v1/snapshots", tags=["snapshots"])
sandbox_router = APIRouter(prefix="/v1/sandboxes", tags=["snapshots"])


def _unlimited(caller: Principal) -> None:
    # A snapshot outlives its sandbox: a token limited to some sandboxes has none of its own.
    if caller.sandbox_ids is not None:
        raise PermissionDenied("a token limited to some sandboxes cannot use snapshots")


@sandbox_router.post("/{sandbox}/snapshots", response_model=Snapshot, status_code=201)
async def create_snapshot(
    sandbox: str, body: SnapshotCreate, services: ServicesDep, caller: Caller
) -> Snapshot:
    """Capture the running sandbox's files (its writable root and /workspace), its processes
    frozen for the moment of capture. A stopped, paused or deleted sandbox: 409."""
    caller.require(Scope.sandboxes)
    _unlimited(caller)
    found = await usable_sandbox(services, caller, sandbox)
    return await services.snapshots.create(found.id, body)


@sandbox_router.post("/{sandbox}/fork", response_model=Sandbox, status_code=201)
async def fork_sandbox(
    sandbox: str, body: SandboxCreate, services: ServicesDep, caller: Caller
) -> Sandbox:
    """A snapshot of the running sandbox and a new sandbox from it on the same node, with the
    create options given; env, limits and network not given are the source's. The answer's
    `snapshot` names the snapshot taken."""
    caller.require(Scope.sandboxes)
    _unlimited(caller)
    found = await usable_sandbox(services, caller, sandbox)
    return await services.snapshots.fork(found.id, body)


@router.get("", response_model=Page[Snapshot])
async def list_snapshots(
    services: ServicesDep,
    caller: Caller,
    sandbox: str | None = Query(
        None, max_length=64, description="Only those taken of this sandbox (id or name)"
    ),
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = None,
) -> Page[Snapshot]:
    caller.require(Scope.read)
    _unlimited(caller)
    if sandbox is not None:
        # A name is that of a live sandbox; an id may be of a deleted one (its snapshots stay).
        with contextlib.suppress(NotFound):
            sandbox = (await services.sandboxes.row(sandbox)).id
    return await services.snapshots.list(sandbox=sandbox, limit=limit, cursor=cursor)


@router.get("/{snapshot}", response_model=Snapshot)
async def get_snapshot(snapshot: str, services: ServicesDep, caller: Caller) -> Snapshot:
    """A snapshot by id or name, with the sandboxes started from it."""
    caller.require(Scope.read)
    _unlimited(caller)
    return await services.snapshots.get(snapshot)


@router.delete("/{snapshot}", status_code=204)
async def delete_snapshot(snapshot: str, services: ServicesDep, caller: Caller) -> Response:
    """Its files go from its node; refused (409) while a sandbox started from it is not
    deleted."""
    caller.require(Scope.sandboxes)
    _unlimited(caller)
    await services.snapshots.delete(snapshot)
    return Response(status_code=204)
