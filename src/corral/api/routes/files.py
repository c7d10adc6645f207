"""Files in and out of a sandbox: directories as tar.gz streams, single files as raw bytes, and
stat, list, mkdir, move, delete. All of it is done inside the sandbox as its user; bodies stream
in both directions (nothing is held whole in memory). Needs the `files` scope."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from corral.api.auth import Caller, ServicesDep, running_sandbox
from corral.api.errors import STORAGE_FULL, error_responses
from corral.core.errors import PayloadTooLarge
from corral.core.models import (
    MAX_PATH,
    ArchiveUploaded,
    FileInfo,
    FileList,
    MkdirRequest,
    MoveRequest,
    Scope,
)
from corral.core.tokens import Principal
from corral.services import Services

router = APIRouter(prefix="/v1/sandboxes/{sandbox}", tags=["files"])

CLIENT_CLOSED = 499  # the client went away mid-upload (for the access log only)
PATH = Query(
    ..., min_length=1, max_length=MAX_PATH, description="Absolute, or relative to /workspace"
)
# Answered besides the native errors by the routes that write.
WRITES = error_responses(statuses=STORAGE_FULL)
BINARY_BODY = {
    "requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}
}


async def _sandbox_id(services: Services, caller: Principal, sandbox: str) -> str:
    caller.require(Scope.files)
    return (await running_sandbox(services, caller, sandbox)).id


def _check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the upload exceeds {limit} bytes")


class _Gone(Exception):
    """The client went away in the middle of its upload."""


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise _Gone() from None


@router.put(
    "/archive",
    response_model=ArchiveUploaded,
    responses=WRITES,
    openapi_extra={
        "requestBody": {"content": {"application/gzip": {"schema": {"type": "string"}}}}
    },
)
async def upload_archive(
    request: Request, sandbox: str, services: ServicesDep, caller: Caller, path: str = PATH
) -> ArchiveUploaded:
    """Extract a tar archive (gzip; plain, bzip2 and xz too) into the directory `path`, created
    if missing. Entries are checked one by one: absolute names, `..`, links leading outside,
    devices and FIFOs are refused (400 `unsafe_archive`), and so is a `path` that is a symlink.
    Limits: compressed size, uncompressed size, entry count (413). Entries written before an
    error stay."""
    sandbox_id = await _sandbox_id(services, caller, sandbox)
    _check_length(request, services.settings.max_upload_bytes)
    try:
        return await services.files.upload_archive(sandbox_id, path, _body(request))
    except _Gone:
        return Response(status_code=CLIENT_CLOSED)  # type: ignore[return-value]


@router.get(
    "/archive",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/gzip": {}}}},
)
async def download_archive(
    sandbox: str,
    services: ServicesDep,
    caller: Caller,
    path: str = PATH,
    level: int = Query(1, ge=0, le=9, description="gzip level (0: store only, fastest)"),
) -> StreamingResponse:
    """The directory `path` as a tar.gz stream, entries relative to it. Symlinks are stored as
    links. A failure after the first byte breaks the response off (the client sees an
    incomplete body, never a shorter archive)."""
    sandbox_id = await _sandbox_id(services, caller, sandbox)
    _, download = await services.files.open_download(
        sandbox_id, "archive", {"path": path, "level": level}
    )
    try:
        name = str(download.header.get("path") or "archive").rstrip("/").rsplit("/", 1)[-1]
        return StreamingResponse(
            download,
            media_type="application/gzip",
            headers={"Content-Disposition": _disposition(f"{name or 'root'}.tar.gz")},
            background=BackgroundTask(download.abort),  # also when the client went away
        )
    except BaseException:
        await download.abort()
        raise


@router.put("/files", response_model=FileInfo, responses=WRITES, openapi_extra=BINARY_BODY)
async def upload_file(
    request: Request,
    sandbox: str,
    services: ServicesDep,
    caller: Caller,
    path: str = PATH,
    mode: str | None = Query(None, pattern=r"^0?[0-7]{3,4}$", description="Octal, e.g. 0755"),
) -> FileInfo:
    """Write the body to the file `path` (parents created), replacing it atomically; a symlink
    there is replaced, not written through. The mode is kept unless given."""
    sandbox_id = await _sandbox_id(services, caller, sandbox)
    _check_length(request, services.settings.max_upload_bytes)
    try:
        return await services.files.write_file(
            sandbox_id, path, _body(request), mode=int(mode, 8) if mode else None
        )
    except _Gone:
        return Response(status_code=CLIENT_CLOSED)  # type: ignore[return-value]


@router.get(
    "/files",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download_file(
    sandbox: str, services: ServicesDep, caller: Caller, path: str = PATH
) -> StreamingResponse:
    """The bytes of the regular file `path` (symlinks followed), with its length."""
    sandbox_id = await _sandbox_id(services, caller, sandbox)
    _, download = await services.files.open_download(sandbox_id, "read", {"path": path})
    try:
        info = download.header.get("info") or {}
        return StreamingResponse(
            download,
            media_type="application/octet-stream",
            headers={
                "Content-Length": str(int(download.header["size"])),
                "Content-Disposition": _disposition(str(info.get("name") or "file")),
                "X-Corral-Mode": format(int(info.get("mode", 0o644)), "04o"),
            },
            background=BackgroundTask(download.abort),  # also when the client went away
        )
    except BaseException:
        await download.abort()
        raise


@router.delete("/files", status_code=204)
async def delete_file(
    sandbox: str,
    services: ServicesDep,
    caller: Caller,
    path: str = PATH,
    recursive: bool = Query(False, description="Delete a directory and everything in it"),
) -> Response:
    """Delete a file, a symlink (not what it points to) or a directory (empty, or with
    `recursive`)."""
    sandbox_id = await _sandbox_id(services, caller, sandbox)
    await services.files.delete(sandbox_id, path, recursive=recursive)
    return Response(status_code=204)


@router.get("/files/stat", response_model=FileInfo)
async def stat_file(
    sandbox: str,
    services: ServicesDep,
    caller: Caller,
    path: str = PATH,
    follow: bool = Query(False, description="Describe what a symlink points to"),
) -> FileInfo:
    sandbox_id = await _sandbox_id(services, caller, sandbox)
    return await services.files.stat(sandbox_id, path, follow=follow)


@router.get("/files/list", response_model=FileList)
async def list_files(
    sandbox: str,
    services: ServicesDep,
    caller: Caller,
    path: str = PATH,
    limit: int = Query(10_000, ge=1, le=100_000),
) -> FileList:
    """A directory's entries, sorted by name (symlinks described, not followed)."""
    sandbox_id = await _sandbox_id(services, caller, sandbox)
    return await services.files.list(sandbox_id, path, limit=limit)


@router.post("/files/mkdir", response_model=FileInfo, responses=WRITES)
async def make_directory(
    sandbox: str, body: MkdirRequest, services: ServicesDep, caller: Caller
) -> FileInfo:
    sandbox_id = await _sandbox_id(services, caller, sandbox)
    return await services.files.mkdir(sandbox_id, body.path, parents=body.parents, mode=body.mode)


@router.post("/files/move", response_model=FileInfo, responses=WRITES)
async def move_file(
    sandbox: str, body: MoveRequest, services: ServicesDep, caller: Caller
) -> FileInfo:
    """Rename `source` to `destination` (409 if it exists, unless `overwrite`)."""
    sandbox_id = await _sandbox_id(services, caller, sandbox)
    return await services.files.move(
        sandbox_id, body.source, body.destination, overwrite=body.overwrite
    )


def _disposition(name: str) -> str:
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"
