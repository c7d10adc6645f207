"""The blocking client. `AsyncClient` mirrors it method for method."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from types import TracebackType
from typing import IO, Any, TypeVar

import httpx
import pydantic

from corral.client._base import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    BaseClient,
    Call,
    CommandRef,
    Pager,
    SandboxRef,
    TimeoutValue,
    _mode_header,
    _ref,
    _sandbox_path,
)
from corral.client._exceptions import (
    APIError,
    ClientClosedError,
    ReadTimeout,
    TransportError,
    map_httpx_errors,
)
from corral.client._streams import ByteStream, EventStream
from corral.client._transfer import (
    CHUNK,
    AtomicFile,
    Source,
    extract_chunks,
    local_file_chunks,
    source_chunks,
    tar_chunks,
)
from corral.client._ws import ExecSession
from corral.core.models import (
    ArchiveUploaded,
    AuditEntry,
    Command,
    CommandStatus,
    FileInfo,
    FileList,
    Health,
    Image,
    Node,
    Port,
    PortUrl,
    RunResult,
    Sandbox,
    SandboxState,
    Scope,
    Snapshot,
    StartedEvent,
    StdinWritten,
    Token,
    TokenCreated,
    Volume,
    VolumeMount,
)
from corral.core.webhook_wire import Webhook, WebhookAttempt

T = TypeVar("T")
M = TypeVar("M", bound=pydantic.BaseModel)


class Client(BaseClient):
    """A connection pool to one Corral server.

    `base_url` defaults to `$CORRAL_URL`, then `http://127.0.0.1:8700`; `token` to `$CORRAL_TOKEN`.
    `timeout` (seconds, or an `httpx.Timeout`) bounds each request, except that `exec` and waiting
    `get_command` calls get the command's own deadline plus a margin. Pass `transport` to route
    requests elsewhere, e.g. `httpx.MockTransport` in tests.

    Creates and command starts carry an `Idempotency-Key` (a new uuid4 each, or the
    `idempotency_key` given); when the exchange breaks, or the server answers 502/503/504, such a
    call is sent again with the same key up to `retries` times, and the server answers the
    retry as it answered (or would have answered) the first.

    Use it as a context manager, or call `close()`, to release its connections.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        token: str | None = None,
        timeout: TimeoutValue = DEFAULT_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        super().__init__(
            base_url=base_url, token=token, timeout=timeout, headers=headers, retries=retries
        )
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._headers,
            timeout=self.timeout,
            transport=transport,
        )

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    def close(self) -> None:
        """Close every pooled connection. The client cannot be used afterwards."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- I/O -----------------------------------------------------------------------------------

    def _send(self, call: Call[T]) -> T:
        if self._http.is_closed:
            raise ClientClosedError("the client is closed")
        attempts = self._attempts(call)
        timeout = call.timeout if call.timeout is not None else httpx.USE_CLIENT_DEFAULT
        for attempt in range(attempts):
            last = attempt + 1 == attempts
            try:
                with map_httpx_errors():
                    response = self._http.request(
                        call.method,
                        call.path,
                        params=call.params,
                        json=call.json,
                        content=call.content,
                        headers=call.headers,
                        timeout=timeout,
                    )
            except TransportError as exc:
                # A read that timed out may still be answered by the server: not sent again.
                if last or isinstance(exc, ReadTimeout):
                    raise
                time.sleep(self._retry_delay(attempt))
                continue
            if not last and self._retry_answer(response):
                time.sleep(self._retry_delay(attempt, response))
                continue
            return self._parse(call, response)
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _collect(self, pager: Pager[M]) -> list[M]:
        while (call := pager.next_call()) is not None:
            pager.feed(self._send(call))
        return pager.items

    def _check_open(self) -> None:
        if self._http.is_closed:
            raise ClientClosedError("the client is closed")

    def _open_stream(self, path: str, params: Mapping[str, str | int]) -> httpx.Response:
        """A GET whose body is read as a stream; error statuses raise as usual."""
        self._check_open()
        with map_httpx_errors():
            request = self._http.build_request(
                "GET", path, params=params, timeout=self._stream_timeout()
            )
            response = self._http.send(request, stream=True)
        if not response.is_success:
            try:
                with map_httpx_errors():
                    response.read()
            finally:
                response.close()
            raise APIError.from_response(response)
        return response

    @contextlib.contextmanager
    def _download(
        self, sandbox: SandboxRef, kind: str, params: Mapping[str, str | int]
    ) -> Iterator[httpx.Response]:
        response = self._open_stream(_sandbox_path(sandbox, kind), params)
        try:
            with map_httpx_errors():
                yield response
        finally:
            response.close()

    # --- server --------------------------------------------------------------------------------

    def health(self) -> Health:
        """The server's health, version and runtime."""
        return self._send(self._health_call())

    # --- sandboxes -----------------------------------------------------------------------------

    def create_sandbox(
        self,
        *,
        name: str | None = None,
        template: str | None = None,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        pids: int | None = None,
        disk_mb: int | None = None,
        ttl_seconds: int | None = None,
        node: str | None = None,
        volumes: Iterable[VolumeMount | Mapping[str, Any]] | None = None,
        snapshot: str | Snapshot | None = None,
        image: str | None = None,
        idempotency_key: str | None = None,
    ) -> Sandbox:
        """Create a sandbox; options left out take the server's defaults (`node`: the node to
        place it on; default: the least loaded online node with room; `snapshot`: start from
        one, on its node, with its source's template and image)."""
        call = self._create_sandbox_call(
            snapshot=snapshot,
            node=node,
            name=name,
            template=template,
            env=env,
            labels=labels,
            cpu=cpu,
            memory_mb=memory_mb,
            pids=pids,
            disk_mb=disk_mb,
            ttl_seconds=ttl_seconds,
            volumes=volumes,
            image=image,
        )
        return self._send(self._keyed(call, idempotency_key))

    def list_sandboxes(
        self, *, state: SandboxState | str | None = None, limit: int | None = None
    ) -> list[Sandbox]:
        """Every sandbox (in `state`, if given), fetching page after page; at most `limit`."""
        return self._collect(self._list_sandboxes_pager(state=state, limit=limit))

    def get_sandbox(self, sandbox: SandboxRef) -> Sandbox:
        """A sandbox by id or name."""
        return self._send(self._get_sandbox_call(sandbox))

    def delete_sandbox(self, sandbox: SandboxRef) -> Sandbox:
        """Delete a sandbox and everything in it; returns it in state `deleted`."""
        return self._send(self._delete_sandbox_call(sandbox))

    def expose_port(self, sandbox: SandboxRef, port: int, *, public: bool = False) -> Port:
        """Serve `port` of the sandbox at its URLs (`Sandbox.url(port)`); `public`: without a
        token."""
        return self._send(self._expose_port_call(sandbox, port, public))

    def list_ports(self, sandbox: SandboxRef) -> list[Port]:
        """The sandbox's exposed ports."""
        return self._send(self._list_ports_call(sandbox))

    def unexpose_port(self, sandbox: SandboxRef, port: int) -> Port:
        """Stop serving `port` of the sandbox."""
        return self._send(self._unexpose_port_call(sandbox, port))

    def signed_port_url(self, sandbox: SandboxRef, port: int, *, expires_in: int = 3600) -> PortUrl:
        """A URL of an exposed port that works without a token for `expires_in` seconds."""
        return self._send(self._signed_port_url_call(sandbox, port, expires_in))

    def stop_sandbox(self, sandbox: SandboxRef) -> Sandbox:
        """Stop a sandbox's processes, keeping its files."""
        return self._send(self._stop_sandbox_call(sandbox))

    def start_sandbox(self, sandbox: SandboxRef) -> Sandbox:
        """Start a stopped sandbox again."""
        return self._send(self._start_sandbox_call(sandbox))

    # --- commands ------------------------------------------------------------------------------

    def exec(
        self,
        sandbox: SandboxRef,
        command: str,
        *,
        args: Iterable[str] | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stdin: str | None = None,
        timeout_ms: int | None = None,
        max_output_bytes: int | None = None,
        idempotency_key: str | None = None,
    ) -> Command:
        """Run a command and wait for its end.

        `command` is a shell string, or the program when `args` is given (no shell). A non-zero
        exit is a result, not an error; see `corral.raise_for_status`. `user="root"` runs it as the
        sandbox's own root (sudo), `user=NAME` as another user of the sandbox's (`sudo -u`).
        """
        call = self._exec_call(
            sandbox,
            command,
            args=args,
            cwd=cwd,
            env=env,
            user=user,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
            background=False,
        )
        return self._send(self._keyed(call, idempotency_key))

    def start_command(
        self,
        sandbox: SandboxRef,
        command: str,
        *,
        args: Iterable[str] | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stdin: str | None = None,
        timeout_ms: int | None = None,
        max_output_bytes: int | None = None,
        interactive: bool = False,
        tty: bool = False,
        rows: int | None = None,
        cols: int | None = None,
        idempotency_key: str | None = None,
    ) -> Command:
        """Start a command without waiting; follow it with `get_command(..., wait=True)`, or its
        output with `stream_logs`. With `interactive`, its standard input stays open for
        `send_stdin`; with `tty` it runs on a terminal (`rows` x `cols`)."""
        call = self._exec_call(
            sandbox,
            command,
            args=args,
            cwd=cwd,
            env=env,
            user=user,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
            background=True,
            interactive=interactive,
            tty=tty,
            rows=rows,
            cols=cols,
        )
        return self._send(self._keyed(call, idempotency_key))

    def get_command(
        self,
        sandbox: SandboxRef,
        command_id: CommandRef,
        *,
        wait: bool = False,
        timeout_ms: int | None = None,
    ) -> Command:
        """A command and its output; with `wait`, once it has finished or `timeout_ms` passed."""
        return self._send(
            self._get_command_call(sandbox, command_id, wait=wait, timeout_ms=timeout_ms)
        )

    def list_commands(
        self,
        sandbox: SandboxRef,
        *,
        status: CommandStatus | str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        limit: int | None = None,
    ) -> list[Command]:
        """A sandbox's commands, without their output, fetching page after page; at most `limit`."""
        pager = self._list_commands_pager(
            sandbox, status=status, since=since, until=until, limit=limit
        )
        return self._collect(pager)

    def cancel_command(self, sandbox: SandboxRef, command_id: CommandRef) -> Command:
        """Ask a running command to stop; it ends in status `cancelled`."""
        return self._send(self._cancel_command_call(sandbox, command_id))

    # --- live output and input -----------------------------------------------------------------

    def stream_logs(
        self,
        sandbox: SandboxRef,
        command_id: CommandRef,
        *,
        offset: int = 0,
        stream: str = "both",
        heartbeats: bool = False,
        resume: bool = True,
    ) -> EventStream:
        """A command's output as events, from `offset`: replayed, then live until it ends.

        Iterate the returned stream for `OutputEvent`s, then one `ExitEvent` or `ErrorEvent`
        (`ErrorEvent` when the result is unknown). A dropped connection is resumed from the last
        offset (with `resume`), so every byte comes exactly once. `stream` is "stdout",
        "stderr" or "both"; `heartbeats` also yields the server's keep-alive events.
        """
        path = self._logs_path(sandbox, command_id)
        params = {"format": "ndjson", "stream": stream}
        return EventStream(
            lambda at: self._open_stream(path, {**params, "offset": at}),
            offset,
            heartbeats=heartbeats,
            resume=resume,
        )

    def read_logs(
        self,
        sandbox: SandboxRef,
        command_id: CommandRef,
        *,
        offset: int = 0,
        stream: str = "both",
    ) -> ByteStream:
        """A command's output as raw bytes (stdout and stderr as written, or one `stream`),
        replayed then live until it ends; resumed exactly after a dropped connection."""
        path = self._logs_path(sandbox, command_id)
        params = {"format": "raw", "stream": stream, "offset": offset}
        return ByteStream(lambda skip: self._open_stream(path, {**params, "skip": skip}))

    def exec_stream(
        self,
        sandbox: SandboxRef,
        command: str,
        *,
        args: Iterable[str] | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stdin: str | None = None,
        timeout_ms: int | None = None,
        max_output_bytes: int | None = None,
        heartbeats: bool = False,
    ) -> EventStream:
        """Start a command and stream its events as they happen: first a `StartedEvent` (the
        command's id), then its output, then one `ExitEvent` (or `ErrorEvent`)."""
        started = self.start_command(
            sandbox,
            command,
            args=args,
            cwd=cwd,
            env=env,
            user=user,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
        )
        path = self._logs_path(started.sandbox_id, started.id)
        first = [StartedEvent(command_id=started.id, sandbox_id=started.sandbox_id)]
        return EventStream(
            lambda at: self._open_stream(path, {"format": "ndjson", "offset": at}),
            0,
            heartbeats=heartbeats,
            first=first,
        )

    def send_stdin(
        self, sandbox: SandboxRef, command_id: CommandRef, data: bytes | str, *, close: bool = False
    ) -> StdinWritten:
        """Write to a running interactive command's standard input (then close it, with
        `close`)."""
        return self._send(self._stdin_call(sandbox, command_id, data, close=close))

    def close_stdin(self, sandbox: SandboxRef, command_id: CommandRef) -> StdinWritten:
        """End a running interactive command's standard input (Ctrl-D on a terminal)."""
        return self._send(self._stdin_call(sandbox, command_id, b"", close=True))

    def signal_command(
        self, sandbox: SandboxRef, command_id: CommandRef, signal: str | int
    ) -> None:
        """Send a signal ("INT", "TERM", 9, ...) to a running command's process group."""
        self._send(self._signal_call(sandbox, command_id, signal))

    def resize_command(
        self, sandbox: SandboxRef, command_id: CommandRef, rows: int, cols: int
    ) -> None:
        """Set a running terminal command's window size."""
        self._send(self._resize_call(sandbox, command_id, rows, cols))

    def connect_exec(
        self,
        sandbox: SandboxRef,
        command: str,
        *,
        args: Iterable[str] | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stdin: str | None = None,
        timeout_ms: int | None = None,
        max_output_bytes: int | None = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        kill_on_disconnect: bool = False,
    ) -> ExecSession:
        """Start a command over a WebSocket: send it input (`send_stdin`, `close_stdin`,
        `resize`, `signal`) while reading its events from the session. With `tty` it runs on
        a terminal of `rows` x `cols`. The command runs on if the connection drops (re-attach
        with `attach`), unless `kill_on_disconnect`."""
        start = self._exec_start_frame(
            command,
            args=args,
            cwd=cwd,
            env=env,
            user=user,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
            tty=tty,
            rows=rows,
            cols=cols,
            kill_on_disconnect=kill_on_disconnect,
        )
        url = self._ws_url(_sandbox_path(sandbox, "exec", "stream"))
        self._check_open()
        return ExecSession.open(url, self._ws_headers(), start=start, timeout=self.timeout.connect)

    def attach(
        self, sandbox: SandboxRef, command_id: CommandRef, *, offset: int = 0
    ) -> ExecSession:
        """Attach to a command over a WebSocket: its output from `offset` (replayed, then live)
        and, while it runs and takes input, a way to send it."""
        path = _sandbox_path(sandbox, "commands", _ref(command_id), "attach")
        url = self._ws_url(path, {"offset": offset})
        self._check_open()
        return ExecSession.open(url, self._ws_headers(), start=None, timeout=self.timeout.connect)

    # --- files ---------------------------------------------------------------------------------

    def upload_dir(
        self,
        sandbox: SandboxRef,
        local_dir: str | os.PathLike[str],
        remote_dir: str,
        *,
        level: int = 1,
    ) -> ArchiveUploaded:
        """Copy a local directory's contents into `remote_dir` (created if missing), streamed as
        a tar.gz archive made on the fly (gzip `level`, 0 to store only)."""
        chunks = tar_chunks(local_dir, level)
        try:
            return self._send(self._upload_archive_call(sandbox, remote_dir, chunks))
        finally:
            chunks.close()

    def download_dir(
        self,
        sandbox: SandboxRef,
        remote_dir: str,
        local_dir: str | os.PathLike[str],
        *,
        level: int = 1,
    ) -> int:
        """Copy the contents of `remote_dir` into a local directory (created if missing),
        streamed and extracted as they arrive; returns the number of entries. Entries that
        would land outside `local_dir` (links out, `..`, devices) stop it with an error."""
        with self._download(sandbox, "archive", {"path": remote_dir, "level": level}) as response:
            counts = extract_chunks(response.iter_bytes(CHUNK), local_dir)
        return counts["entries"]

    def upload_archive(
        self, sandbox: SandboxRef, remote_dir: str, source: Source
    ) -> ArchiveUploaded:
        """Extract a tar archive (gzip, plain, bzip2 or xz), given as bytes, a binary file or
        an iterable of bytes, into `remote_dir`."""
        return self._send(self._upload_archive_call(sandbox, remote_dir, source_chunks(source)))

    def download_archive(
        self, sandbox: SandboxRef, remote_dir: str, destination: IO[bytes], *, level: int = 1
    ) -> int:
        """Write `remote_dir` as a tar.gz archive to a binary file; returns its size."""
        size = 0
        with self._download(sandbox, "archive", {"path": remote_dir, "level": level}) as response:
            for chunk in response.iter_bytes(CHUNK):
                destination.write(chunk)
                size += len(chunk)
        return size

    def upload_file(
        self,
        sandbox: SandboxRef,
        local_path: str | os.PathLike[str] | IO[bytes],
        remote_path: str,
        *,
        mode: int | None = None,
    ) -> FileInfo:
        """Copy a local file (a path, or a binary file object) to `remote_path`, streamed; the
        mode is the local file's unless given."""
        if not isinstance(local_path, str | os.PathLike):
            return self.write_file(sandbox, remote_path, local_path, mode=mode)
        if mode is None:
            mode = os.stat(local_path).st_mode & 0o777
        call = self._write_file_call(sandbox, remote_path, local_file_chunks(local_path), mode=mode)
        return self._send(call)

    def download_file(
        self,
        sandbox: SandboxRef,
        remote_path: str,
        local_path: str | os.PathLike[str] | IO[bytes],
    ) -> int:
        """Copy a file of the sandbox to `local_path` (written under a temporary name, then
        renamed into place), or into a binary file object; returns its size."""
        if not isinstance(local_path, str | os.PathLike):
            size = 0
            with self._download(sandbox, "files", {"path": remote_path}) as response:
                for chunk in response.iter_bytes(CHUNK):
                    local_path.write(chunk)
                    size += len(chunk)
            return size
        with self._download(sandbox, "files", {"path": remote_path}) as response:
            target = AtomicFile(local_path, _mode_header(response))
            try:
                for chunk in response.iter_bytes(CHUNK):
                    target.write(chunk)
            except BaseException:
                target.discard()
                raise
        return target.commit()

    def write_file(
        self, sandbox: SandboxRef, path: str, data: Source, *, mode: int | None = None
    ) -> FileInfo:
        """Write a file in the sandbox from bytes, text, a binary file or an iterable of bytes
        (parents created; replaced atomically)."""
        return self._send(self._write_file_call(sandbox, path, source_chunks(data), mode=mode))

    def read_file(self, sandbox: SandboxRef, path: str) -> bytes:
        """The contents of a file in the sandbox (whole: see `download_file` for large ones)."""
        with self._download(sandbox, "files", {"path": path}) as response:
            return response.read()

    def stat_file(self, sandbox: SandboxRef, path: str, *, follow: bool = False) -> FileInfo:
        """A file's type, size, mode and times (of a symlink itself, unless `follow`)."""
        return self._send(self._stat_call(sandbox, path, follow=follow))

    def list_files(self, sandbox: SandboxRef, path: str, *, limit: int | None = None) -> FileList:
        """A directory's entries, sorted by name."""
        return self._send(self._list_files_call(sandbox, path, limit=limit))

    def make_dir(
        self, sandbox: SandboxRef, path: str, *, parents: bool = True, mode: int = 0o755
    ) -> FileInfo:
        """Create a directory (and its parents, with `parents`; then no error if it exists)."""
        return self._send(self._make_dir_call(sandbox, path, parents=parents, mode=mode))

    def move_file(
        self, sandbox: SandboxRef, source: str, destination: str, *, overwrite: bool = False
    ) -> FileInfo:
        """Rename a file or directory (an existing destination only with `overwrite`)."""
        call = self._move_file_call(sandbox, source, destination, overwrite=overwrite)
        return self._send(call)

    def delete_file(self, sandbox: SandboxRef, path: str, *, recursive: bool = False) -> None:
        """Delete a file, a symlink, or a directory (with `recursive` if not empty)."""
        self._send(self._delete_file_call(sandbox, path, recursive=recursive))

    # --- code runs -----------------------------------------------------------------------------

    def run_code(
        self,
        sandbox: SandboxRef,
        code: str | None = None,
        *,
        language: str,
        path: str | None = None,
        args: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | None = None,
        timeout_ms: int | None = None,
        max_output_bytes: int | None = None,
    ) -> RunResult:
        """Run a program (`code`, or the sandbox's file at `path`) in `language` ("typescript",
        "javascript", "python" or "bash") and return its output and structured `result`, set
        by the program with `result.set(value)` (or `result.error(err)`)."""
        call = self._run_code_call(
            sandbox,
            code,
            language=language,
            path=path,
            args=args,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
        )
        return self._send(call)

    # --- tokens --------------------------------------------------------------------------------

    def create_token(
        self,
        *,
        name: str | None = None,
        scopes: Iterable[Scope | str] | None = None,
        sandbox_ids: Iterable[SandboxRef] | None = None,
        expires_in_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> TokenCreated:
        """Create a token; its `secret` is in this response only."""
        call = self._create_token_call(
            name=name,
            scopes=scopes,
            sandbox_ids=sandbox_ids,
            expires_in_seconds=expires_in_seconds,
        )
        return self._send(self._keyed(call, idempotency_key))

    def list_tokens(self) -> list[Token]:
        """Every token (without secrets)."""
        return self._collect(self._list_tokens_pager())

    def delete_token(self, token_id: str | Token) -> None:
        """Revoke a token at once."""
        self._send(self._delete_token_call(token_id))

    # --- audit log -----------------------------------------------------------------------------

    def list_audit(
        self,
        *,
        token: str | None = None,
        action: str | None = None,
        target: str | None = None,
        result: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        """State-changing calls, newest first, fetching page after page; at most `limit`.

        Filters: `token` (a token id, `admin` for the admin key), `action` (exact, or a prefix
        ending in `*`), `target` (a sandbox, token ... id), `result` (ok or error), and a
        time range. Needs the admin key or a token with the `audit` scope."""
        pager = self._list_audit_pager(
            token=token,
            action=action,
            target=target,
            result=result,
            since=since,
            until=until,
            limit=limit,
        )
        return self._collect(pager)

    # --- nodes ---------------------------------------------------------------------------------

    def list_nodes(self) -> list[Node]:
        """The hosts that run sandboxes, with their state, capacity and load."""
        return (self._send(self._list_nodes_call())).items

    def get_node(self, node: str | Node) -> Node:
        return self._send(self._get_node_call(node))

    def drain_node(self, node: str | Node) -> Node:
        """No new sandboxes go to the node; those it holds keep running."""
        return self._send(self._drain_node_call(node, True))

    def undrain_node(self, node: str | Node) -> Node:
        """The node takes new sandboxes again."""
        return self._send(self._drain_node_call(node, False))

    # --- images ---

    def pull_image(
        self,
        reference: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        node: str | None = None,
    ) -> Image:
        """Pull `host[:port]/name[:tag|@digest]` onto a node (credentials, if given, for this
        pull only); start sandboxes from it with `create_sandbox(image=...)`."""
        call = self._pull_image_call(
            reference, username=username, password=password, token=token, node=node
        )
        return self._send(call)

    def import_image(
        self,
        archive: str | os.PathLike[str],
        *,
        reference: str | None = None,
        node: str | None = None,
    ) -> Image:
        """Import an OCI layout tarball or a `docker save` tarball (streamed from the file)."""
        call = self._import_image_call(local_file_chunks(archive), reference=reference, node=node)
        return self._send(call)

    def list_images(self, *, node: str | None = None) -> list[Image]:
        """Every node's images (one entry per node that has one)."""
        return (self._send(self._list_images_call(node))).items

    def get_image(self, image: str | Image, *, node: str | None = None) -> Image:
        """By id, 12+ hex digits of it, or reference."""
        return self._send(self._get_image_call(image, node))

    def delete_image(self, image: str | Image, *, node: str | None = None) -> None:
        """From every node that has it, or `node`'s only (refused while a sandbox uses it)."""
        self._send(self._delete_image_call(image, node))

    # --- volumes ---

    def create_volume(
        self,
        name: str,
        *,
        size_mb: int | None = None,
        node: str | None = None,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Volume:
        """A named file system of `size_mb` MiB on a node that outlives sandboxes; mount it
        with `create_sandbox(volumes=[{"name": ..., "path": "/data"}])`."""
        call = self._create_volume_call(name, size_mb=size_mb, node=node, labels=labels)
        return self._send(self._keyed(call, idempotency_key))

    def list_volumes(self) -> list[Volume]:
        return (self._send(self._list_volumes_call())).items

    def get_volume(self, volume: str | Volume) -> Volume:
        return self._send(self._get_volume_call(volume))

    def delete_volume(self, volume: str | Volume) -> None:
        """Its data goes with it (refused while a live sandbox mounts it)."""
        self._send(self._delete_volume_call(volume))

    # --- webhooks ------------------------------------------------------------------------------

    def create_webhook(
        self,
        url: str,
        events: Iterable[str],
        *,
        sandbox: SandboxRef | None = None,
        secret: str | None = None,
        idempotency_key: str | None = None,
    ) -> Webhook:
        """POST `events` ("command.finished", "sandbox.state"; of `sandbox` only, if given) to
        `url`, signed with `secret` (default: a random one, in this answer only); check
        deliveries with `corral.verify_webhook`."""
        call = self._create_webhook_call(url, events, sandbox=sandbox, secret=secret)
        return self._send(self._keyed(call, idempotency_key))

    def list_webhooks(self) -> list[Webhook]:
        """This token's webhooks (every one, for an admin token); without their secrets."""
        return self._send(self._list_webhooks_call())

    def get_webhook(self, webhook: str | Webhook) -> Webhook:
        return self._send(self._get_webhook_call(webhook))

    def delete_webhook(self, webhook: str | Webhook) -> Webhook:
        """No more deliveries to it, pending ones included."""
        return self._send(self._delete_webhook_call(webhook))

    def list_webhook_deliveries(
        self, webhook: str | Webhook, *, limit: int | None = None
    ) -> list[WebhookAttempt]:
        """Every delivery attempt to the webhook, newest first; at most `limit`."""
        return self._collect(self._webhook_deliveries_pager(webhook, limit))

    # --- snapshots -----------------------------------------------------------------------------

    def create_snapshot(
        self,
        sandbox: SandboxRef,
        *,
        name: str | None = None,
        expires_in: int | None = None,
        expires_at: datetime | None = None,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Snapshot:
        """Capture a running sandbox's files (its processes frozen for the moment); it is
        removed `expires_in` seconds on, or at `expires_at`, if given."""
        call = self._create_snapshot_call(
            sandbox, name=name, expires_in=expires_in, expires_at=expires_at, labels=labels
        )
        return self._send(self._keyed(call, idempotency_key))

    def list_snapshots(
        self, *, sandbox: SandboxRef | None = None, limit: int | None = None
    ) -> list[Snapshot]:
        """Every snapshot (of `sandbox`, if given), fetching page after page; at most `limit`."""
        return self._collect(self._list_snapshots_pager(sandbox=sandbox, limit=limit))

    def get_snapshot(self, snapshot: str | Snapshot) -> Snapshot:
        """A snapshot by id or name."""
        return self._send(self._get_snapshot_call(snapshot))

    def delete_snapshot(self, snapshot: str | Snapshot) -> None:
        """Its files go (refused while a sandbox started from it is not deleted)."""
        self._send(self._delete_snapshot_call(snapshot))

    def fork(
        self,
        sandbox: SandboxRef,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        pids: int | None = None,
        disk_mb: int | None = None,
        ttl_seconds: int | None = None,
        volumes: Iterable[VolumeMount | Mapping[str, Any]] | None = None,
        idempotency_key: str | None = None,
    ) -> Sandbox:
        """A snapshot of the running sandbox and a new sandbox from it, on its node, with the
        source's env, limits and network unless given here; the new sandbox's `snapshot` names
        the snapshot taken."""
        call = self._fork_call(
            sandbox,
            name=name,
            template=None,
            env=env,
            labels=labels,
            cpu=cpu,
            memory_mb=memory_mb,
            pids=pids,
            disk_mb=disk_mb,
            ttl_seconds=ttl_seconds,
            volumes=volumes,
        )
        return self._send(self._keyed(call, idempotency_key))
