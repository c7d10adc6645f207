"""A session's files, as the SDK moves them: `fs/write` (a tar.gz extracted under the `x-cwd`
directory), `fs/read` (one file's bytes; 404 when it is missing, which the SDK turns into
null) and `fs/mkdir`. Done inside the sandbox as its user."""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, Header, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from corral.api.auth import get_services
from corral.api.faces.vercel.wire import FilePath, caller, router, session_row
from corral.core.commands import default_cwd
from corral.core.errors import BadRequest, NotFound, PayloadTooLarge
from corral.core.models import MAX_PATH, Scope
from corral.core.tokens import Principal
from corral.services import Services
from corral.store.tables import SandboxRow

Caller = Depends(caller)
ServicesDep = Depends(get_services)


class FileNotFound(NotFound):
    code = "file_not_found"


def _absolute(path: str, cwd: str | None, default: str) -> str:
    base = cwd or default
    if not base.startswith("/"):
        raise BadRequest("cwd must be an absolute path")
    full = posixpath.normpath(posixpath.join(base, path))
    if len(full) > MAX_PATH or "\0" in full:
        raise BadRequest("the path is too long or holds a NUL byte")
    return full


async def _session(services: Services, principal: Principal, session_id: str) -> SandboxRow:
    principal.require(Scope.files)
    return await session_row(services, principal, session_id)


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        yield chunk


@router.post(
    "/v2/sandboxes/sessions/{session_id}/fs/write",
    summary="Write files: a tar.gz body, extracted under the x-cwd directory",
    openapi_extra={
        "requestBody": {"content": {"application/gzip": {"schema": {"type": "string"}}}}
    },
)
async def write_files(
    session_id: str,
    request: Request,
    x_cwd: str | None = Header(None, description="Where the archive's entries are extracted"),
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    row = await _session(services, principal, session_id)
    length = request.headers.get("content-length")
    limit = services.settings.max_upload_bytes
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the upload exceeds {limit} bytes")
    target = _absolute(".", x_cwd, default_cwd(row))
    await services.files.upload_archive(row.id, target, _body(request))
    return {}


@router.post(
    "/v2/sandboxes/sessions/{session_id}/fs/read",
    summary="One file's bytes",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def read_file(
    session_id: str,
    body: FilePath,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> StreamingResponse:
    row = await _session(services, principal, session_id)
    path = _absolute(body.path, body.cwd, default_cwd(row))
    try:
        _, download = await services.files.open_download(row.id, "read", {"path": path})
    except NotFound:
        raise FileNotFound(f"no file {path}") from None
    try:
        return StreamingResponse(
            download,
            media_type="application/octet-stream",
            headers={"Content-Length": str(int(download.header["size"]))},
            background=BackgroundTask(download.abort),  # also when the client went away
        )
    except BaseException:
        await download.abort()
        raise


@router.post("/v2/sandboxes/sessions/{session_id}/fs/mkdir", summary="Make a directory")
async def make_directory(
    session_id: str,
    body: FilePath,
    services: Services = ServicesDep,
    principal: Principal = Caller,
) -> dict[str, Any]:
    row = await _session(services, principal, session_id)
    path = _absolute(body.path, body.cwd, default_cwd(row))
    await services.files.mkdir(row.id, path, parents=False, mode=0o755)
    return {}
