"""`/v1/images`: container images in the nodes' stores, for sandboxes to start from."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from fastapi import APIRouter, Query, Request, Response
from starlette.requests import ClientDisconnect

from corral.api.auth import Caller, ServicesDep
from corral.api.errors import error_responses
from corral.core.errors import BadRequest, PayloadTooLarge, PermissionDenied
from corral.core.models import IMAGE_REF_PATTERN, NODE_ID_PATTERN, Image, ImagePull, Page, Scope
from corral.core.tokens import Principal

router = APIRouter(prefix="/v1/images", tags=["images"])

# Besides the native errors: what a registry or a node's store can answer.
IMAGE_ERRORS = error_responses(
    statuses={
        502: "The registry failed, or served content that does not match its digest",
        507: "The node's image store is full",
    }
)
NODE = Query(default=None, pattern=NODE_ID_PATTERN, description="Only this node's")
ARCHIVE_BODY = {"requestBody": {"content": {"application/x-tar": {"schema": {"type": "string"}}}}}


def _unlimited(caller: Principal) -> None:
    # An image serves every sandbox of its node: a token limited to some sandboxes has none.
    if caller.sandbox_ids is not None:
        raise PermissionDenied("a token limited to some sandboxes cannot use images")


@router.post("", response_model=Image, status_code=201, responses=IMAGE_ERRORS)
async def pull_image(body: ImagePull, services: ServicesDep, caller: Caller) -> Image:
    """Pull `reference` from its registry onto a node (digests verified, layers unpacked and
    checked): sandboxes on that node then start from it at once. Plain HTTP only for the
    registries in CORRAL_INSECURE_REGISTRIES. Credentials are used for this pull only."""
    caller.require(Scope.sandboxes)
    _unlimited(caller)
    return await services.images.pull(body)


@router.post(
    "/import", response_model=Image, status_code=201, responses=IMAGE_ERRORS,
    openapi_extra=ARCHIVE_BODY,
)  # fmt: skip
async def import_image(
    request: Request,
    services: ServicesDep,
    caller: Caller,
    reference: str | None = Query(
        default=None,
        pattern=IMAGE_REF_PATTERN,
        max_length=1024,
        description="The name to give it (default: the archive's own, if it has one)",
    ),
    node: str | None = Query(default=None, pattern=NODE_ID_PATTERN),
) -> Image:
    """The body is an OCI layout tarball or a `docker save` tarball of one image."""
    caller.require(Scope.sandboxes)
    _unlimited(caller)
    limit = services.settings.max_image_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the archive exceeds {limit} bytes")
    uploads = services.settings.data_dir / "image-uploads"
    uploads.mkdir(mode=0o700, exist_ok=True)
    archive = uploads / f"{secrets.token_hex(8)}.tar"
    try:
        await _receive(request, archive, limit)
        return await services.images.import_archive(archive, reference=reference, node_id=node)
    finally:
        with contextlib.suppress(OSError):
            archive.unlink()


async def _receive(request: Request, dest: Path, limit: int) -> None:
    """The body into `dest`, at most `limit` bytes of it."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    seen = 0
    with os.fdopen(fd, "wb") as f:
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise PayloadTooLarge(f"the archive exceeds {limit} bytes")
                f.write(chunk)
        except ClientDisconnect:
            raise BadRequest("the upload was cut short") from None
    if seen == 0:
        raise BadRequest("the body must be an image archive (a tar file)")


@router.get("", response_model=Page[Image])
async def list_images(
    services: ServicesDep, caller: Caller, node: str | None = NODE
) -> Page[Image]:
    """Every node's images (one entry per node that has one), with the sandboxes using them."""
    caller.require(Scope.read)
    _unlimited(caller)
    return Page[Image](items=await services.images.list(node))


@router.get("/{image:path}", response_model=Image)
async def get_image(
    image: str, services: ServicesDep, caller: Caller, node: str | None = NODE
) -> Image:
    """An image by id (`sha256:...`, or 12+ of its hex digits) or reference."""
    caller.require(Scope.read)
    _unlimited(caller)
    return await services.images.get(image, node)


@router.delete("/{image:path}", status_code=204, responses=IMAGE_ERRORS)
async def delete_image(
    image: str, services: ServicesDep, caller: Caller, node: str | None = NODE
) -> Response:
    """Removed from every node that has it (or from `node`'s store only), with the layers no
    other image uses; refused (409) while a live sandbox runs on it."""
    caller.require(Scope.sandboxes)
    _unlimited(caller)
    await services.images.delete(image, node)
    return Response(status_code=204)
