"""Files in and out of a sandbox, done inside it as its user by a helper program.

The server never touches a sandbox's files itself: each operation runs `files.py` (see
`corral.core.tools.files`) in the sandbox through the node, like a command, without entering the
command history. Contents stream both ways with back-pressure (stdin of the helper for uploads,
its unlogged stdout for downloads), so memory use does not depend on the size of a transfer.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from corral import ids
from corral.core.errors import (
    BadRequest,
    Conflict,
    CorralError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    SandboxNotRunning,
    Unavailable,
)
from corral.core.models import ArchiveUploaded, CommandStatus, FileInfo, FileList
from corral.node.base import CommandOutcome, CommandSpec, Execution, Node
from corral.node.directory import NodeDirectory
from corral.runtime.base import NODE_PYTHON, SandboxDied, SpawnError
from corral.settings import Settings

log = logging.getLogger(__name__)

TOOLS_MOUNT = "/opt/corral"
PYTHON = NODE_PYTHON
FILES_HELPER = f"{TOOLS_MOUNT}/files.py"
HELPER_PREFIX = "fop"  # ids of helper runs (never in the command history)
METADATA_TIMEOUT_MS = 60_000
MAX_REPLY = 32 << 20  # bytes of JSON a metadata operation may answer
MAX_HEADER = 64 << 10
CHUNK = 1 << 20


class InsufficientStorage(CorralError):
    status, code = 507, "insufficient_storage"


class HelperFailed(CorralError):
    status, code = 500, "internal"


# The helper's error codes, as API errors (status, class).
_ERRORS: dict[str, type[CorralError]] = {
    "not_found": NotFound,
    "exists": Conflict,
    "conflict": Conflict,
    "not_empty": Conflict,
    "not_a_directory": BadRequest,
    "is_a_directory": BadRequest,
    "not_a_file": BadRequest,
    "invalid_path": BadRequest,
    "bad_archive": BadRequest,
    "unsafe_archive": BadRequest,
    "changed": Conflict,
    "forbidden_path": PermissionDenied,
    "too_large": PayloadTooLarge,
    "too_deep": BadRequest,
    "busy": Conflict,
    "no_space": InsufficientStorage,
}


def helper_error(
    stderr: bytes, outcome: CommandOutcome | None, *, sandbox_running: bool = True
) -> CorralError:
    """The API error for a failed helper run: the report on the last line of its stderr, else
    what ended it (its sandbox stopping, a timeout, a signal)."""
    for line in reversed(stderr.decode("utf-8", "replace").strip().splitlines()):
        try:
            body = json.loads(line)["error"]
            code, message = str(body["code"]), str(body["message"])
        except (ValueError, KeyError, TypeError):
            continue
        error = _ERRORS.get(code, HelperFailed)(message)
        error.code = code
        return error
    status = outcome.status if outcome is not None else None
    # Stopping (or deleting) a sandbox cancels what runs in it; nothing else cancels a helper
    # whose caller is still waiting for its answer.
    if not sandbox_running or status is CommandStatus.cancelled:
        return SandboxNotRunning("the sandbox was stopped during the file operation")
    if status is CommandStatus.timed_out:
        return Unavailable("the file operation timed out")
    if status is CommandStatus.lost:
        return Unavailable(f"the sandbox stopped during the file operation: {outcome.error}")
    if outcome is not None and outcome.oom_killed:
        return Unavailable("the file operation ran out of the sandbox's memory")
    if outcome is not None and outcome.signal is not None:
        return Unavailable(f"the file operation was killed by signal {outcome.signal}")
    text = stderr.decode("utf-8", "replace").strip()[-500:]
    log.warning("file helper failed (%s): %s", outcome and outcome.status, text)
    return HelperFailed(f"the file operation failed: {text or 'no reason given'}")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object the file helper sent (its header or its answer), or HelperFailed."""
    try:
        value = json.loads(data)
    except ValueError:
        raise HelperFailed(f"the file helper sent an invalid {what}") from None
    if not isinstance(value, dict):
        raise HelperFailed(f"the file helper sent an invalid {what}")
    return value


def to_info(raw: dict[str, Any]) -> FileInfo:
    return FileInfo(
        **{**raw, "modified_at": datetime.fromtimestamp(float(raw["modified_at"]), UTC)}
    )


class Helper:
    """One run of the helper in a sandbox."""

    def __init__(self, execution: Execution, node: Node) -> None:
        self.execution = execution
        self.node = node
        self._pending = b""

    async def read_header(self) -> dict[str, Any] | None:
        """The JSON line the helper writes before its data; None if it failed first."""
        buffer = bytearray()
        while b"\n" not in buffer:
            data = await self.execution.read_stdout(CHUNK)
            if not data:
                return None
            buffer += data
            if len(buffer) > MAX_HEADER and b"\n" not in buffer:
                raise HelperFailed("the file helper sent an invalid header")
        line, _, rest = bytes(buffer).partition(b"\n")
        self._pending = rest
        return _json_object(line, "header")

    async def read(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        return await self.execution.read_stdout(CHUNK)

    async def read_all(self, limit: int) -> bytes:
        out = bytearray()
        while data := await self.read():
            out += data
            if len(out) > limit:
                raise HelperFailed("the file helper's answer is too large")
        return bytes(out)

    async def failure(self) -> CorralError:
        outcome = await self.execution.outcome()
        spec = self.execution.spec
        _, stderr = await self.node.output(spec.sandbox_id, spec.id)
        running = await self.node.sandbox_running(spec.sandbox_id)
        return helper_error(stderr, outcome, sandbox_running=running)

    async def succeeded(self) -> bool:
        outcome = await self.execution.outcome()
        return outcome.status.value == "completed" and outcome.exit_code == 0

    async def close(self) -> None:
        await self.execution.close_stdout()

    async def abort(self) -> None:
        """Stop the helper (the request failed or went away)."""
        await self.execution.close_stdout()
        if not self.execution.finished:
            await self.execution.cancel()


class FileService:
    def __init__(self, directory: NodeDirectory, settings: Settings) -> None:
        self.directory = directory
        self.settings = settings

    async def _start(
        self,
        sandbox_id: str,
        op: str,
        args: dict[str, Any],
        *,
        interactive: bool = False,
        timeout_ms: int = METADATA_TIMEOUT_MS,
    ) -> Helper:
        spec = CommandSpec(
            id=ids.new_id(HELPER_PREFIX),
            sandbox_id=sandbox_id,
            argv=[PYTHON, "-I", "-S", FILES_HELPER, op, json.dumps(args)],
            env={},
            cwd="/",
            stdin=None,
            timeout_ms=timeout_ms,
            max_output_bytes=64 << 10,  # stderr only: error reports
            interactive=interactive,
            raw_stdout=True,
            keep_log=False,
            report=False,
        )
        node = await self.directory.for_sandbox(sandbox_id)
        try:
            return Helper(await node.run(spec), node)
        except SandboxDied as exc:
            raise Unavailable(f"sandbox {sandbox_id} is not running: {exc}") from None
        except SpawnError as exc:
            raise HelperFailed(f"the file helper could not start: {exc}") from None

    async def call(self, sandbox_id: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """A metadata operation: its JSON answer, or the API error it reports."""
        helper = await self._start(sandbox_id, op, args)
        try:
            reply = await helper.read_all(MAX_REPLY)
            ok = await helper.succeeded()
        except BaseException:
            await helper.abort()
            raise
        await helper.close()
        if not ok:
            raise await helper.failure()
        return _json_object(reply, "answer")

    # --- metadata ---

    async def stat(self, sandbox_id: str, path: str, *, follow: bool = False) -> FileInfo:
        return to_info(await self.call(sandbox_id, "stat", {"path": path, "follow": follow}))

    async def list(self, sandbox_id: str, path: str, *, limit: int) -> FileList:
        answer = await self.call(sandbox_id, "list", {"path": path, "limit": limit})
        return FileList(
            path=answer["path"],
            entries=[to_info(e) for e in answer["entries"]],
            truncated=bool(answer.get("truncated")),
        )

    async def mkdir(self, sandbox_id: str, path: str, *, parents: bool, mode: int) -> FileInfo:
        args = {"path": path, "parents": parents, "mode": mode}
        return to_info(await self.call(sandbox_id, "mkdir", args))

    async def move(
        self, sandbox_id: str, source: str, destination: str, *, overwrite: bool
    ) -> FileInfo:
        args = {"source": source, "destination": destination, "overwrite": overwrite}
        return to_info(await self.call(sandbox_id, "move", args))

    async def delete(self, sandbox_id: str, path: str, *, recursive: bool) -> None:
        await self.call(sandbox_id, "delete", {"path": path, "recursive": recursive})

    # --- contents ---

    async def _feed(self, helper: Helper, body: AsyncIterator[bytes], limit: int) -> int:
        """Copy the request body to the helper's stdin, counting it against `limit`."""
        received = 0
        execution = helper.execution
        async for chunk in body:
            if not chunk:
                continue
            received += len(chunk)
            if received > limit:
                await helper.abort()
                raise PayloadTooLarge(f"the upload exceeds {limit} bytes")
            try:
                await execution.write_stdin(chunk)
            except BrokenPipeError:
                return received  # the helper stopped reading: its report says why
        with contextlib.suppress(BrokenPipeError):
            await execution.close_stdin()
        return received

    async def upload_archive(
        self,
        sandbox_id: str,
        path: str,
        body: AsyncIterator[bytes],
        *,
        max_bytes: int | None = None,
        max_expanded_bytes: int | None = None,
        max_entries: int | None = None,
    ) -> ArchiveUploaded:
        """Extract a tar body into `path`; the server's limits, or lower ones a caller gives
        (a face whose original has its own)."""
        settings = self.settings
        args = {
            "path": path,
            "max_entries": min(max_entries or settings.max_upload_entries,
                               settings.max_upload_entries),
            "max_bytes": min(max_expanded_bytes or settings.max_upload_expanded_bytes,
                             settings.max_upload_expanded_bytes),
        }  # fmt: skip
        helper = await self._start(
            sandbox_id, "extract", args, interactive=True, timeout_ms=settings.max_timeout_ms
        )
        limit = min(max_bytes or settings.max_upload_bytes, settings.max_upload_bytes)
        try:
            received = await self._feed(helper, body, limit)
            reply = await helper.read_all(MAX_REPLY)
            if not await helper.succeeded():
                raise await helper.failure()
        except BaseException:
            await helper.abort()
            raise
        await helper.close()
        answer = json.loads(reply)
        return ArchiveUploaded(
            path=answer["path"],
            entries=answer["entries"],
            bytes=answer["bytes"],
            compressed_bytes=received,
        )

    async def write_file(
        self, sandbox_id: str, path: str, body: AsyncIterator[bytes], *, mode: int | None
    ) -> FileInfo:
        helper = await self._start(
            sandbox_id,
            "write",
            {"path": path, "mode": mode, "parents": True},
            interactive=True,
            timeout_ms=self.settings.max_timeout_ms,
        )
        try:
            await self._feed(helper, body, self.settings.max_upload_bytes)
            reply = await helper.read_all(MAX_REPLY)
            if not await helper.succeeded():
                raise await helper.failure()
        except BaseException:
            await helper.abort()
            raise
        await helper.close()
        return to_info(json.loads(reply))

    async def open_download(
        self, sandbox_id: str, op: str, args: dict[str, Any]
    ) -> tuple[dict[str, Any], Download]:
        """Start a download (`read` or `archive`): its header, and its bytes as a stream.

        Errors known before the first byte raise here (so they become proper API errors); a
        failure later ends the stream with an exception, which aborts the response. A caller
        that does not read the stream to its end must call its `abort()` (e.g. as the
        response's background task, which also runs when the client went away).
        """
        helper = await self._start(sandbox_id, op, args, timeout_ms=self.settings.max_timeout_ms)
        try:
            header = await helper.read_header()
            if header is None:
                await helper.close()
                raise await helper.failure()
        except BaseException:
            await helper.abort()
            raise
        return header, Download(header, helper)

    async def watch(self, sandbox_id: str, path: str, *, recursive: bool) -> Watch:
        """Start watching a directory (inotify, inside the sandbox as its user): its changes
        come from the returned Watch as they happen, until its `abort()`. Errors known at the
        start (no such directory) raise here."""
        args = {"path": path, "recursive": recursive}
        helper = await self._start(
            sandbox_id, "watch", args, timeout_ms=self.settings.max_timeout_ms
        )
        try:
            if await helper.read_header() is None:
                await helper.close()
                raise await helper.failure()
        except BaseException:
            await helper.abort()
            raise
        return Watch(helper)


class Download:
    """A download in progress: its header, then its bytes (`async for`)."""

    def __init__(self, header: dict[str, Any], helper: Helper) -> None:
        self.header = header
        self._helper = helper

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        helper = self._helper
        try:
            while data := await helper.read():
                yield data
            if not await helper.succeeded():
                error = await helper.failure()
                raise HelperFailed(f"the download broke off: {error.message}")
        finally:
            await helper.abort()

    async def abort(self) -> None:
        """Stop the helper (idempotent; nothing happens once it has ended)."""
        await self._helper.abort()


class Watch:
    """A directory being watched: `events()` yields `{"name", "type"}` (the path relative to
    the directory; create, write, remove, rename or chmod) until the watch ends (its sandbox
    stopped, or `abort()`)."""

    def __init__(self, helper: Helper) -> None:
        self._helper = helper

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        buffer = b""
        while data := await self._helper.read():
            buffer += data
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                event = _json_object(line, "event")
                if "name" in event:  # (an overflow report has none)
                    yield event
            if len(buffer) > MAX_HEADER:
                raise HelperFailed("the file helper sent an invalid event")

    async def abort(self) -> None:
        await self._helper.abort()
