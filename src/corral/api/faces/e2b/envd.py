"""The E2B in-sandbox daemon ("envd") under `/e2b/envd`, as the `e2b` SDK calls it with
`E2B_SANDBOX_URL=<corral>/e2b/envd`: one URL for every sandbox, the sandbox named by the
`E2b-Sandbox-Id` header and authorized by its `X-Access-Token` (the `envdAccessToken` of the
control API). The user a call acts as comes, as in envd, from `Authorization: Basic
base64("<user>:")`: `root` is Corral's sudo (uid 0 of the sandbox's own user namespace),
`user` or none the sandbox's normal user.

- `POST /e2b/envd/process.Process/<Method>` and `.../filesystem.Filesystem/<Method>`: Connect
  RPC (see `connect.py`, `process.py`, `filesystem.py`). Errors are Connect's `{"code",
  "message"}` (401 unauthenticated for a wrong token, 404 not_found for a sandbox that is
  gone).
- `GET /e2b/envd/files?path=&username=` downloads one file; `POST` uploads one or more, as
  `multipart/form-data` (each part's filename its path) or one `application/octet-stream`
  body (optionally gzip); it answers `[{"name", "type", "path"}]`. Errors `{"code",
  "message"}`.
- `GET /e2b/envd/health`: 204 while the sandbox runs; 502 `{"message": "... was not found"}`
  (what E2B's proxy answers) once it is gone, which the SDK reads as "not running".

Relative paths are relative to the user's home, `/workspace` for the sandbox's user and
`/root` for root, as in the sandbox's own environment. File operations run as the sandbox's
user whatever the `username` (Corral's file helper has no root mode yet).

This face speaks envd version 0.5.7 (the control API says so): the SDK then uses no file
metadata and no watch entry info. Not covered: the `https://49983-<id>.<domain>` host form
(Corral has no per-sandbox hosts yet), process tags.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import math
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf.message import Message
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask

from corral.api.auth import get_services
from corral.api.faces._common import Problem, face_router
from corral.api.faces.e2b import connect
from corral.api.faces.e2b.connect import ConnectError
from corral.api.faces.e2b.control import access_token
from corral.core.errors import BadRequest, NotFound, Unauthenticated, Unavailable
from corral.core.models import SandboxState
from corral.services import Services
from corral.store.tables import SandboxRow

TAG = "E2B (in-sandbox daemon)"
HOMES = {"user": "/workspace", "root": "/root"}
MAX_KEEPALIVE = 300.0


def rpc_path(request: Request) -> bool:
    return "/e2b/envd/process." in request.url.path or "/e2b/envd/filesystem." in request.url.path


def render(request: Request, problem: Problem) -> Response:
    if rpc_path(request):
        return connect.error_response(ConnectError.of_status(problem.status, problem.message))
    status = 400 if problem.status == 422 else problem.status
    return JSONResponse({"code": status, "message": problem.message}, status_code=status)


class EnvdError(BaseModel):
    """The daemon's error body: Connect's on the RPC routes, envd's on /files and /health."""

    code: int | str = Field(description="Connect's code (RPC), or the HTTP status (/files)")
    message: str


router = face_router(
    TAG,
    render,
    error_model=EnvdError,
    extra_errors={415: "A content type Connect does not define (RPC)"},
    prefix="/e2b/envd",
)


@dataclass
class Envd:
    """One call's sandbox and user."""

    services: Services
    sandbox: SandboxRow
    user: str  # "user" or "root"
    request: Request

    @property
    def home(self) -> str:
        return HOMES[self.user]

    @property
    def exec_user(self) -> str | None:
        """Corral's `user` for a command: None (the sandbox's user) or "root"."""
        return "root" if self.user == "root" else None

    def path(self, path: str) -> str:
        if not path:
            return self.home
        if path == "~" or path.startswith("~/"):
            path = self.home + path[1:]
        elif not path.startswith("/"):
            path = self.home.rstrip("/") + "/" + path
        if "\x00" in path:
            raise BadRequest("the path must not contain NUL bytes")
        return path

    def keepalive(self) -> float:
        """Seconds between keepalive messages on a stream, as the SDK asks for."""
        try:
            value = float(self.request.headers.get("keepalive-ping-interval", "50"))
        except ValueError:
            value = 50.0
        if not math.isfinite(value):
            value = 50.0
        return min(max(value, 1.0), MAX_KEEPALIVE)


def _user(request: Request, username: str | None = None) -> str:
    if username is None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic" and value:
            try:
                username = base64.b64decode(value.strip(), validate=True).decode().partition(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                raise BadRequest("the Authorization header is not valid Basic auth") from None
    if not username or username == "user":
        return "user"
    if username == "root":
        return "root"
    raise BadRequest(f"unknown user {username!r}: this sandbox has 'user' and 'root'")


async def sandbox_call(request: Request, username: str | None = None) -> Envd:
    """The sandbox a call is for, once its access token is checked."""
    services = get_services(request)
    sandbox_id = request.headers.get("e2b-sandbox-id", "").strip()
    if not sandbox_id:
        raise BadRequest("the E2b-Sandbox-Id header is missing")
    token = request.headers.get("x-access-token", "")
    if not token or not hmac.compare_digest(token, access_token(services, sandbox_id)):
        raise Unauthenticated("invalid or missing X-Access-Token for this sandbox")
    try:
        row = await services.sandboxes.row(sandbox_id)
    except NotFound:
        raise NotFound(f"sandbox {sandbox_id} was not found") from None
    if row.state == SandboxState.paused.value:
        raise Unavailable(f"sandbox {row.id} is paused: connect to it to resume it")
    if row.state == SandboxState.creating.value:
        raise Unavailable(f"sandbox {row.id} is starting; try again")
    if row.state != SandboxState.running.value:
        raise NotFound(f"sandbox {row.id} was not found ({row.state})")
    row = await services.sandboxes.check_running(row)
    return Envd(services, row, _user(request, username), request)


# --- Connect RPC -------------------------------------------------------------------------------

UnaryHandler = Callable[[Envd, Any], Awaitable[Message]]
StreamHandler = Callable[[Envd, Any], AsyncIterator[Message]]
ClientStreamHandler = Callable[[Envd, AsyncIterator[bytes], connect.Codec], Awaitable[Message]]


@dataclass(frozen=True)
class Method:
    kind: str  # "unary", "server_stream" or "client_stream"
    request: type[Message] | None
    handler: Callable[..., Any]


METHODS: dict[tuple[str, str], Method] = {}


def rpc(service: str, name: str, kind: str, request: type[Message] | None) -> Callable[..., Any]:
    def register(handler: Callable[..., Any]) -> Callable[..., Any]:
        METHODS[(service, name)] = Method(kind, request, handler)
        return handler

    return register


@router.post(
    "/{service}/{method}",
    summary="A Connect call of process.Process or filesystem.Filesystem",
    responses={200: {"content": {"application/json": {}, "application/connect+json": {}}}},
)
async def call(service: str, method: str, request: Request) -> Response:
    found = METHODS.get((service, method))
    if found is None:
        # As a Connect server's router answers a procedure it does not have.
        return connect.error_response(ConnectError("not_found", f"no procedure {service}/{method}"))
    if found.kind == "unary":
        assert found.request is not None
        request_cls = found.request

        async def answer(message: Message) -> Message:
            return await found.handler(await sandbox_call(request), message)  # type: ignore[no-any-return]

        return await connect.unary(request, request_cls, answer)
    try:
        codec = connect.stream_codec(request)
    except ConnectError as exc:
        return connect.error_response(exc)
    if found.kind == "server_stream":
        assert found.request is not None
        stream_request = found.request
        body = await request.body()

        async def messages() -> AsyncIterator[Message]:
            message = connect.first_message(body, codec, stream_request)
            ctx = await sandbox_call(request)
            async for item in found.handler(ctx, message):
                yield item

        return connect.server_stream(codec, messages())

    async def consume(messages: AsyncIterator[bytes]) -> Message:
        ctx = await sandbox_call(request)
        return await found.handler(ctx, messages, codec)  # type: ignore[no-any-return]

    return await connect.client_stream(request, codec, consume)


# --- files and health --------------------------------------------------------------------------


@router.get("/health", status_code=204, summary="Whether the sandbox runs")
async def health(request: Request) -> Response:
    services = get_services(request)
    sandbox_id = request.headers.get("e2b-sandbox-id", "").strip()
    if sandbox_id:
        try:
            row = await services.sandboxes.row(sandbox_id)
        except NotFound:
            row = None
        if row is None or row.state not in (
            SandboxState.running.value,
            SandboxState.paused.value,
            SandboxState.creating.value,
        ):
            return JSONResponse(
                {
                    "sandboxId": sandbox_id,
                    "message": f"The sandbox {sandbox_id} was not found",
                    "code": 502,
                },
                status_code=502,
            )
    return Response(status_code=204)


@router.get(
    "/files",
    summary="Download a file",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download(
    request: Request,
    path: str = Query(..., description="Absolute, or relative to the user's home"),
    username: str | None = Query(None, description="user (default) or root"),
) -> StreamingResponse:
    ctx = await sandbox_call(request, username)
    full = ctx.path(path)
    header, stream = await ctx.services.files.open_download(ctx.sandbox.id, "read", {"path": full})
    name = full.rstrip("/").rsplit("/", 1)[-1] or "file"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if isinstance(header.get("size"), int):
        headers["Content-Length"] = str(header["size"])
    return StreamingResponse(
        stream,
        media_type="application/octet-stream",
        headers=headers,
        background=BackgroundTask(stream.abort),
    )


def _written(path: str) -> dict[str, str]:
    return {"name": path.rstrip("/").rsplit("/", 1)[-1], "type": "file", "path": path}


async def _gunzip(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        async for chunk in body:
            out = inflate.decompress(chunk)
            if out:
                yield out
        rest = inflate.flush()
    except zlib.error:
        raise BadRequest("the body is not valid gzip") from None
    if rest:
        yield rest


@router.post("/files", summary="Upload files (multipart, or one octet-stream body)")
async def upload(
    request: Request,
    path: str | None = Query(None, description="The file's path (one file)"),
    username: str | None = Query(None, description="user (default) or root"),
) -> list[dict[str, str]]:
    ctx = await sandbox_call(request, username)
    files = ctx.services.files
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        if not path:
            raise BadRequest("an octet-stream upload needs the path query parameter")
        full = ctx.path(path)
        body: AsyncIterator[bytes] = request.stream()
        if request.headers.get("content-encoding", "").lower() == "gzip":
            body = _gunzip(body)
        await files.write_file(ctx.sandbox.id, full, body, mode=None)
        return [_written(full)]
    form = await request.form(max_files=10_000, max_fields=10_000)
    uploads = [value for _, value in form.multi_items() if not isinstance(value, str)]
    if not uploads:
        raise BadRequest("the form has no file")
    written = []
    try:
        for item in uploads:
            target = path if (path and len(uploads) == 1) else item.filename
            if not target:
                raise BadRequest("each file part needs its path as the filename")
            full = ctx.path(target)

            async def chunks(item: Any = item) -> AsyncIterator[bytes]:
                while data := await item.read(1 << 20):
                    yield data

            await files.write_file(ctx.sandbox.id, full, chunks(), mode=None)
            written.append(_written(full))
    finally:
        await form.close()
    return written


# The RPC handlers register themselves on import.
from corral.api.faces.e2b import filesystem, process  # noqa: E402

__all__ = ["filesystem", "process", "router"]
