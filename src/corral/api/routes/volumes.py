"""`/v1/volumes`: named persistent file systems on a node, mounted by its sandboxes."""

from __future__ import annotations

from fastapi import APIRouter, Response

from corral.api.auth import Caller, ServicesDep
from corral.core.errors import PermissionDenied
from corral.core.models import Page, Scope, Volume, VolumeCreate
from corral.core.tokens import Principal

router = APIRouter(prefix="/v1/volumes", tags=["volumes"])


def _unlimited(caller: Principal) -> None:
    # A volume outlives sandboxes: a token limited to some sandboxes has none of its own.
    if caller.sandbox_ids is not None:
        raise PermissionDenied("a token limited to some sandboxes cannot use volumes")


@router.post("", response_model=Volume, status_code=201)
async def create_volume(body: VolumeCreate, services: ServicesDep, caller: Caller) -> Volume:
    """A volume of `size_mb` MiB (its own file system: the size is its limit) on a node;
    sandboxes mount it with `"volumes": [{"name", "path", "read_only"}]` and go to its node."""
    caller.require(Scope.sandboxes)
    _unlimited(caller)
    return await services.volumes.create(body)


@router.get("", response_model=Page[Volume])
async def list_volumes(services: ServicesDep, caller: Caller) -> Page[Volume]:
    caller.require(Scope.read)
    _unlimited(caller)
    return Page[Volume](items=await services.volumes.list())


@router.get("/{volume}", response_model=Volume)
async def get_volume(volume: str, services: ServicesDep, caller: Caller) -> Volume:
    """A volume by id or name, with the live sandboxes that mount it."""
    caller.require(Scope.read)
    _unlimited(caller)
    return await services.volumes.get(volume)


@router.delete("/{volume}", status_code=204)
async def delete_volume(volume: str, services: ServicesDep, caller: Caller) -> Response:
    """Its data goes with it; refused (409) while a live sandbox mounts it."""
    caller.require(Scope.sandboxes)
    _unlimited(caller)
    await services.volumes.delete(volume)
    return Response(status_code=204)
