"""`/v1/sandboxes`: create, list, inspect, stop, start and delete sandboxes."""

from __future__ import annotations

from fastapi import APIRouter, Query

from corral.api.auth import Caller, ServicesDep, usable_sandbox
from corral.core.errors import PermissionDenied
from corral.core.models import (
    InjectRule,
    Page,
    Sandbox,
    SandboxCreate,
    SandboxNetwork,
    SandboxState,
    SandboxUpdate,
    Scope,
)
from corral.core.tokens import Principal
from corral.services import Services

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])
templates_router = APIRouter(tags=["sandboxes"])


def _may_inject(caller: Principal, rules: list[InjectRule] | None) -> None:
    # A rule sends a secret to a host of the caller's choosing: only for who may hold secrets.
    if rules and any(r.secret_names() for r in rules):
        caller.require(Scope.secrets)


async def visible_sandbox(services: Services, caller: Principal, ref: str) -> Sandbox:
    return services.sandboxes.model(await usable_sandbox(services, caller, ref))


@router.post("", status_code=201, response_model=Sandbox)
async def create_sandbox(body: SandboxCreate, services: ServicesDep, caller: Caller) -> Sandbox:
    caller.require(Scope.sandboxes)
    if caller.sandbox_ids is not None:
        raise PermissionDenied("a token limited to certain sandboxes cannot create sandboxes")
    _may_inject(caller, body.inject)
    return await services.sandboxes.create(body)


@router.get("", response_model=Page[Sandbox])
async def list_sandboxes(
    services: ServicesDep,
    caller: Caller,
    state: SandboxState | None = None,
    include_deleted: bool = False,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = None,
) -> Page[Sandbox]:
    caller.require(Scope.read)
    return await services.sandboxes.list(
        state=state,
        include_deleted=include_deleted,
        only=caller.sandbox_ids,
        limit=limit,
        cursor=cursor,
    )


@templates_router.get("/v1/templates", response_model=list[str])
async def list_templates(services: ServicesDep, caller: Caller) -> list[str]:
    """Root file system templates: 'host' (the host's /usr) and those the operator placed in
    the templates directory."""
    caller.require(Scope.read)
    return await services.sandboxes.templates()


@router.get("/{sandbox}", response_model=Sandbox)
async def get_sandbox(sandbox: str, services: ServicesDep, caller: Caller) -> Sandbox:
    caller.require(Scope.read)
    return await visible_sandbox(services, caller, sandbox)


@router.delete("/{sandbox}", response_model=Sandbox)
async def delete_sandbox(sandbox: str, services: ServicesDep, caller: Caller) -> Sandbox:
    caller.require(Scope.sandboxes)
    found = await visible_sandbox(services, caller, sandbox)
    return await services.sandboxes.delete(found.id)


@router.patch("/{sandbox}", response_model=Sandbox)
async def update_sandbox(
    sandbox: str, body: SandboxUpdate, services: ServicesDep, caller: Caller
) -> Sandbox:
    """Change the network policy; allow-list changes apply at once to a running sandbox."""
    caller.require(Scope.sandboxes)
    _may_inject(caller, body.inject)
    found = await visible_sandbox(services, caller, sandbox)
    return await services.sandboxes.update(found.id, body)


@router.get("/{sandbox}/network", response_model=SandboxNetwork)
async def sandbox_network(sandbox: str, services: ServicesDep, caller: Caller) -> SandboxNetwork:
    """The allow-list and injection rules, and what the node counted while the sandbox runs:
    connections allowed and refused, DNS answers and refusals, recent refusals with host and
    reason, injections per rule."""
    caller.require(Scope.read)
    found = await visible_sandbox(services, caller, sandbox)
    return await services.sandboxes.network(found.id)


@router.post("/{sandbox}/stop", response_model=Sandbox)
async def stop_sandbox(sandbox: str, services: ServicesDep, caller: Caller) -> Sandbox:
    caller.require(Scope.sandboxes)
    found = await visible_sandbox(services, caller, sandbox)
    return await services.sandboxes.stop(found.id)


@router.post("/{sandbox}/start", response_model=Sandbox)
async def start_sandbox(sandbox: str, services: ServicesDep, caller: Caller) -> Sandbox:
    caller.require(Scope.sandboxes)
    found = await visible_sandbox(services, caller, sandbox)
    return await services.sandboxes.start(found.id)


@router.post("/{sandbox}/pause", response_model=Sandbox)
async def pause_sandbox(sandbox: str, services: ServicesDep, caller: Caller) -> Sandbox:
    """Freeze every process of the sandbox (cgroup freezer); nothing runs until resumed."""
    caller.require(Scope.sandboxes)
    found = await visible_sandbox(services, caller, sandbox)
    return await services.sandboxes.pause(found.id)


@router.post("/{sandbox}/resume", response_model=Sandbox)
async def resume_sandbox(sandbox: str, services: ServicesDep, caller: Caller) -> Sandbox:
    caller.require(Scope.sandboxes)
    found = await visible_sandbox(services, caller, sandbox)
    return await services.sandboxes.resume(found.id)
