"""run-dat-sheesh's images and snapshots, over Corral's own.

`/v1/images` and `/v1/snapshots` are also Corral's native routes, with other shapes. A request
in run-dat-sheesh's auth style (an `X-API-Key` header and no `Authorization` header, or the
`rds_session` cookie and no key) gets this face's answer; any other request, one without a key
included, the native one (a 401 either way when the key is missing or wrong). The routes are
left out of the OpenAPI document, where the native operations of the same paths stand.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Response
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope as AsgiScope

from corral.api.auth import get_services, usable_sandbox
from corral.api.faces._common import face_router
from corral.api.faces.rundatsheesh.vms import (
    COOKIE,
    TAG,
    RdsError,
    caller,
    iso,
    render,
    router,
)
from corral.core.errors import CorralError, PermissionDenied
from corral.core.models import Image, Scope, Snapshot, SnapshotCreate
from corral.core.tokens import Principal
from corral.services import Services


def in_face_style(scope: AsgiScope) -> bool:
    """Whether a request authenticates as run-dat-sheesh's clients do."""
    headers = dict(scope.get("headers") or [])
    if b"authorization" in headers:
        return False
    if headers.get(b"x-api-key"):
        return True
    return COOKIE.encode() + b"=" in headers.get(b"cookie", b"")


claimed = face_router(TAG, render, error_model=RdsError)


class ClaimedRoute(claimed.route_class):  # type: ignore[misc,name-defined]
    """A route that matches only requests in the face's auth style: the others go on to the
    native route of the same path."""

    def matches(self, scope: AsgiScope) -> tuple[Match, AsgiScope]:
        if scope["type"] == "http" and not in_face_style(scope):
            return Match.NONE, {}
        return APIRoute.matches(self, scope)


claimed.route_class = ClaimedRoute


def _unlimited(principal: Principal) -> None:
    # Images and snapshots serve every sandbox: a token limited to some has none of them.
    if principal.sandbox_ids is not None:
        raise PermissionDenied("a token limited to some sandboxes cannot use images or snapshots")


def image_json(image: Image) -> dict[str, Any]:
    return {
        "id": image.id,
        "name": image.references[0] if image.references else image.id,
        "references": image.references,
        "nodeId": image.node_id,
        "sizeBytes": image.size,
        "createdAt": iso(image.added_at),
        "isDefault": False,
        "usedBy": image.used_by,
    }


async def snapshot_json(services: Services, snapshot: Snapshot) -> dict[str, Any]:
    cpu = mem = None
    try:
        source = await services.sandboxes.row(snapshot.sandbox_id)
        cpu, mem = source.spec.get("cpu"), source.spec.get("memory_mb")
    except CorralError:
        pass  # its sandbox is gone for good
    return {
        "id": snapshot.id,
        "kind": "vm",
        "vmId": snapshot.sandbox_id,
        "sourceVmId": snapshot.sandbox_id,
        "createdAt": iso(snapshot.created_at),
        "cpu": cpu,
        "memMb": mem,
        "imageId": snapshot.image,
        "hasDisk": True,
        "sizeBytes": snapshot.size_bytes,
        "state": snapshot.state.value,
        "usedBy": snapshot.used_by,
    }


# --- snapshots -----------------------------------------------------------------------------------


# Not a shared path: on the face's own router.
@router.post("/v1/vms/{vm_id}/snapshots", status_code=201, summary="Snapshot a VM")
async def create_snapshot(
    vm_id: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.sandboxes)
    _unlimited(principal)
    row = await usable_sandbox(services, principal, vm_id)
    return await snapshot_json(services, await services.snapshots.create(row.id, SnapshotCreate()))


@claimed.get("/v1/snapshots", include_in_schema=False)
async def list_snapshots(
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> list[dict[str, Any]]:
    principal.require(Scope.read)
    _unlimited(principal)
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await services.snapshots.list(cursor=cursor, limit=500)
        items += [await snapshot_json(services, s) for s in page.items]
        cursor = page.next_cursor
        if cursor is None:
            return items


@claimed.get("/v1/snapshots/{snapshot}", include_in_schema=False)
async def get_snapshot(
    snapshot: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    _unlimited(principal)
    return await snapshot_json(services, await services.snapshots.get(snapshot))


@claimed.delete("/v1/snapshots/{snapshot}", status_code=204, include_in_schema=False)
async def delete_snapshot(
    snapshot: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> Response:
    principal.require(Scope.sandboxes)
    _unlimited(principal)
    await services.snapshots.delete(snapshot)
    return Response(status_code=204)


# --- images --------------------------------------------------------------------------------------


@claimed.get("/v1/images", include_in_schema=False)
async def list_images(
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> list[dict[str, Any]]:
    principal.require(Scope.read)
    _unlimited(principal)
    return [image_json(image) for image in await services.images.list()]


@claimed.get("/v1/images/{image:path}", include_in_schema=False)
async def get_image(
    image: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> dict[str, Any]:
    principal.require(Scope.read)
    _unlimited(principal)
    return image_json(await services.images.get(image))


@claimed.delete("/v1/images/{image:path}", status_code=204, include_in_schema=False)
async def delete_image(
    image: str,
    services: Services = Depends(get_services),
    principal: Principal = Depends(caller),
) -> Response:
    principal.require(Scope.sandboxes)
    _unlimited(principal)
    await services.images.delete(image)
    return Response(status_code=204)
