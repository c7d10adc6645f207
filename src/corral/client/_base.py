"""What `Client` and `AsyncClient` share: configuration, request building and response parsing.

Nothing here does I/O, so the two clients differ only in how they send a `Call`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from corral.client._exceptions import APIError, ConfigError, DecodingError
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
    Page,
    Port,
    PortUrl,
    RunResult,
    Sandbox,
    SandboxState,
    Scope,
    Snapshot,
    StdinWritten,
    Token,
    TokenCreated,
    Volume,
    VolumeMount,
)
from corral.core.webhook_wire import Webhook, WebhookAttempt

T = TypeVar("T")
M = TypeVar("M", bound=pydantic.BaseModel)

DEFAULT_BASE_URL = "http://127.0.0.1:8700"
DEFAULT_TIMEOUT = 30.0
# Requests that wait on the server (exec, get_command with wait) may take this much longer than
# the deadline the server was given, to cover queueing, the kill grace and the network.
WAIT_MARGIN_SECONDS = 30.0
PAGE_SIZE = 100
STREAM_READ_TIMEOUT = 120.0  # seconds a stream may stay silent (the server sends heartbeats)
IDEMPOTENCY_HEADER = "Idempotency-Key"
DEFAULT_RETRIES = 2  # of a call made with an idempotency key, when the exchange broke
RETRY_BASE_SECONDS = 0.5
# Answers after which a keyed call is sent again: the server was briefly away, or the first
# request with the key is still being answered (the retry then gets its answer).
RETRY_STATUSES = frozenset({502, 503, 504})
RETRY_CODES = frozenset({"idempotency_in_flight"})

SandboxRef = str | Sandbox
CommandRef = str | Command
TimeoutValue = float | httpx.Timeout | None


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One API request and how to read its success response."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str | int] | None = None
    json: Any = None
    timeout: httpx.Timeout | None = None  # None: the client's own timeout
    content: Any = None  # a raw body: bytes, or an iterator of bytes (streamed)
    headers: Mapping[str, str] | None = None


class Pager(Generic[M]):
    """Walks a paginated listing: ask `next_call()` for a request, `feed()` it the page."""

    def __init__(
        self,
        make_call: Callable[[str | None, int], Call[Page[M]]],
        limit: int | None,
    ) -> None:
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        self._make_call = make_call
        self._limit = limit
        self._cursor: str | None = None
        self._done = limit == 0
        self.items: list[M] = []

    def next_call(self) -> Call[Page[M]] | None:
        if self._done:
            return None
        size = PAGE_SIZE if self._limit is None else min(PAGE_SIZE, self._limit - len(self.items))
        return self._make_call(self._cursor, size)

    def feed(self, page: Page[M]) -> None:
        self.items.extend(page.items)
        if self._limit is not None and len(self.items) >= self._limit:
            del self.items[self._limit :]
            self._done = True
        # An empty page or a repeated cursor would otherwise loop for ever.
        elif not page.items or page.next_cursor is None or page.next_cursor == self._cursor:
            self._done = True
        self._cursor = page.next_cursor


class BaseClient:
    """Configuration and the I/O-free half of every API method."""

    def __init__(
        self,
        *,
        base_url: str | None,
        token: str | None,
        timeout: TimeoutValue,
        headers: Mapping[str, str] | None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        from corral import __version__  # here, not at import time: corral imports this module

        self.base_url = _check_base_url(
            base_url or os.environ.get("CORRAL_URL") or DEFAULT_BASE_URL
        )
        token = token or os.environ.get("CORRAL_TOKEN") or None
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._headers = {"user-agent": f"corral-python/{__version__}", "accept": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self._headers.update(headers or {})
        if retries < 0:
            raise ValueError("retries must not be negative")
        self.retries = retries

    # --- timeouts ------------------------------------------------------------------------------

    def _waiting_timeout(self, server_ms: int | None) -> httpx.Timeout:
        """The client timeout for a request the server holds open for up to `server_ms`.

        With no server deadline given the server applies its own default, which only it knows,
        so the read is left unbounded: the server, not the client, ends the wait.
        """
        read: float | None = None
        if server_ms is not None and self.timeout.read is not None:
            read = max(self.timeout.read, server_ms / 1000 + WAIT_MARGIN_SECONDS)
        return httpx.Timeout(
            connect=self.timeout.connect,
            read=read,
            write=self.timeout.write,
            pool=self.timeout.pool,
        )

    # --- idempotency and retries ---------------------------------------------------------------

    @staticmethod
    def _keyed(call: Call[T], key: str | None) -> Call[T]:
        """`call` with an Idempotency-Key (`key`, else a new random one): the server does it
        once, and answers every retry of it (with the same key) as it answered the first."""
        key = key or str(uuid.uuid4())
        return dataclasses.replace(call, headers={**(call.headers or {}), IDEMPOTENCY_HEADER: key})

    def _attempts(self, call: Call[Any]) -> int:
        """How often `call` may be sent: only one with a key is safe to send again."""
        keyed = call.headers is not None and IDEMPOTENCY_HEADER in call.headers
        return 1 + self.retries if keyed else 1

    @staticmethod
    def _retry_answer(response: httpx.Response) -> bool:
        if response.headers.get("idempotent-replayed") == "true":
            return False  # the first request's own answer: it stays what it is
        if response.status_code in RETRY_STATUSES:
            return True
        if response.status_code != 409:
            return False
        try:
            return response.json()["error"]["code"] in RETRY_CODES  # type: ignore[no-any-return]
        except (ValueError, KeyError, TypeError):
            return False

    @staticmethod
    def _retry_delay(attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds before attempt `attempt + 1`: Retry-After if the server gave one (bounded),
        else exponential with jitter."""
        if response is not None:
            try:
                return min(10.0, max(0.0, float(response.headers.get("retry-after", ""))))
            except ValueError:
                pass
        return RETRY_BASE_SECONDS * (2**attempt) * random.uniform(0.5, 1.0)

    # --- responses -----------------------------------------------------------------------------

    def _parse(self, call: Call[T], response: httpx.Response) -> T:
        if not response.is_success:
            raise APIError.from_response(response)
        try:
            result = call.parse(response)
        except pydantic.ValidationError as exc:
            raise DecodingError(
                f"unexpected response to {call.method} {call.path}: {exc}", response=response
            ) from exc
        for item in result.items if isinstance(result, Page) else (result,):
            if isinstance(item, Sandbox):
                item._api_url = self.base_url.rstrip("/")  # for Sandbox.url()
        return result

    # --- calls ---------------------------------------------------------------------------------

    def _health_call(self) -> Call[Health]:
        return Call("GET", "/healthz", _model(Health))

    def _create_sandbox_call(
        self,
        *,
        name: str | None,
        template: str | None,
        env: Mapping[str, str] | None,
        labels: Mapping[str, str] | None,
        cpu: float | None,
        memory_mb: int | None,
        pids: int | None,
        disk_mb: int | None,
        ttl_seconds: int | None,
        node: str | None = None,
        volumes: Iterable[VolumeMount | Mapping[str, Any]] | None = None,
        snapshot: str | Snapshot | None = None,
        image: str | None = None,
    ) -> Call[Sandbox]:
        body = _without_none(
            image=image,
            node=node,
            volumes=None if volumes is None else [_mount(v) for v in volumes],
            snapshot=None if snapshot is None else _snapshot_ref(snapshot),
            name=name,
            template=template,
            env=_dict_or_none(env),
            labels=_dict_or_none(labels),
            cpu=cpu,
            memory_mb=memory_mb,
            pids=pids,
            disk_mb=disk_mb,
            ttl_seconds=ttl_seconds,
        )
        return Call("POST", "/v1/sandboxes", _model(Sandbox), json=body)

    def _list_sandboxes_pager(
        self, *, state: SandboxState | str | None, limit: int | None
    ) -> Pager[Sandbox]:
        def make_call(cursor: str | None, size: int) -> Call[Page[Sandbox]]:
            params = _without_none(limit=size, cursor=cursor, state=_enum_value(state))
            return Call("GET", "/v1/sandboxes", _model(Page[Sandbox]), params=params)

        return Pager(make_call, limit)

    def _get_sandbox_call(self, sandbox: SandboxRef) -> Call[Sandbox]:
        return Call("GET", _sandbox_path(sandbox), _model(Sandbox))

    def _delete_sandbox_call(self, sandbox: SandboxRef) -> Call[Sandbox]:
        return Call("DELETE", _sandbox_path(sandbox), _model(Sandbox))

    def _stop_sandbox_call(self, sandbox: SandboxRef) -> Call[Sandbox]:
        return Call("POST", _sandbox_path(sandbox, "stop"), _model(Sandbox))

    def _start_sandbox_call(self, sandbox: SandboxRef) -> Call[Sandbox]:
        return Call("POST", _sandbox_path(sandbox, "start"), _model(Sandbox))

    def _exec_call(
        self,
        sandbox: SandboxRef,
        command: str,
        *,
        args: Iterable[str] | None,
        cwd: str | None,
        env: Mapping[str, str] | None,
        stdin: str | None,
        timeout_ms: int | None,
        max_output_bytes: int | None,
        background: bool,
        user: str | None = None,
        interactive: bool = False,
        tty: bool = False,
        rows: int | None = None,
        cols: int | None = None,
    ) -> Call[Command]:
        body = _without_none(
            command=command,
            args=None if args is None else list(args),
            cwd=cwd,
            env=_dict_or_none(env),
            user=user,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
            interactive=interactive or None,
            tty=tty or None,
            rows=rows,
            cols=cols,
        )
        if background:
            return Call("POST", _sandbox_path(sandbox, "commands"), _model(Command), json=body)
        return Call(
            "POST",
            _sandbox_path(sandbox, "exec"),
            _model(Command),
            json=body,
            timeout=self._waiting_timeout(timeout_ms),
        )

    def _get_command_call(
        self, sandbox: SandboxRef, command: CommandRef, *, wait: bool, timeout_ms: int | None
    ) -> Call[Command]:
        path = _sandbox_path(sandbox, "commands", _ref(command))
        if not wait:
            return Call("GET", path, _model(Command))
        params = _without_none(wait="true", timeout_ms=timeout_ms)
        return Call(
            "GET", path, _model(Command), params=params, timeout=self._waiting_timeout(timeout_ms)
        )

    def _list_commands_pager(
        self,
        sandbox: SandboxRef,
        *,
        status: CommandStatus | str | None,
        since: datetime | str | None,
        until: datetime | str | None,
        limit: int | None,
    ) -> Pager[Command]:
        path = _sandbox_path(sandbox, "commands")

        def make_call(cursor: str | None, size: int) -> Call[Page[Command]]:
            params = _without_none(
                limit=size,
                cursor=cursor,
                status=_enum_value(status),
                since=_timestamp(since),
                until=_timestamp(until),
            )
            return Call("GET", path, _model(Page[Command]), params=params)

        return Pager(make_call, limit)

    def _cancel_command_call(self, sandbox: SandboxRef, command: CommandRef) -> Call[Command]:
        path = _sandbox_path(sandbox, "commands", _ref(command), "cancel")
        return Call("POST", path, _model(Command))

    # --- streams and input ---------------------------------------------------------------------

    def _logs_path(self, sandbox: SandboxRef, command: CommandRef) -> str:
        return _sandbox_path(sandbox, "commands", _ref(command), "logs")

    def _stream_timeout(self) -> httpx.Timeout:
        """Streams are kept alive by heartbeats: a read may wait longer than a request would."""
        read = None if self.timeout.read is None else max(self.timeout.read, STREAM_READ_TIMEOUT)
        return httpx.Timeout(
            connect=self.timeout.connect,
            read=read,
            write=self.timeout.write,
            pool=self.timeout.pool,
        )

    def _stdin_call(
        self, sandbox: SandboxRef, command: CommandRef, data: bytes | str, *, close: bool
    ) -> Call[StdinWritten]:
        body = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        return Call(
            "POST",
            _sandbox_path(sandbox, "commands", _ref(command), "stdin"),
            _model(StdinWritten),
            params={"close": "true"} if close else None,
            content=body,
            headers={"content-type": "application/octet-stream"},
        )

    def _signal_call(
        self, sandbox: SandboxRef, command: CommandRef, signal: str | int
    ) -> Call[None]:
        path = _sandbox_path(sandbox, "commands", _ref(command), "signal")
        return Call("POST", path, _nothing, json={"signal": _signal_value(signal)})

    def _resize_call(
        self, sandbox: SandboxRef, command: CommandRef, rows: int, cols: int
    ) -> Call[None]:
        path = _sandbox_path(sandbox, "commands", _ref(command), "resize")
        return Call("POST", path, _nothing, json={"rows": rows, "cols": cols})

    def _ws_url(self, path: str, params: Mapping[str, str | int] | None = None) -> str:
        url = httpx.URL(self.base_url + path, params=params or None)
        return str(url.copy_with(scheme="wss" if url.scheme == "https" else "ws"))

    def _ws_headers(self) -> dict[str, str]:
        return {k: v for k, v in self._headers.items() if k.lower() not in ("accept",)}

    def _exec_start_frame(
        self,
        command: str,
        *,
        args: Iterable[str] | None,
        cwd: str | None,
        env: Mapping[str, str] | None,
        stdin: str | None,
        timeout_ms: int | None,
        max_output_bytes: int | None,
        tty: bool,
        rows: int,
        cols: int,
        kill_on_disconnect: bool,
        user: str | None = None,
    ) -> dict[str, Any]:
        return {
            "type": "start",
            **_without_none(
                command=command,
                args=None if args is None else list(args),
                cwd=cwd,
                env=_dict_or_none(env),
                user=user,
                stdin=stdin,
                timeout_ms=timeout_ms,
                max_output_bytes=max_output_bytes,
            ),
            "tty": tty,
            "rows": rows,
            "cols": cols,
            "kill_on_disconnect": kill_on_disconnect,
        }

    # --- files ---------------------------------------------------------------------------------

    def _stat_call(self, sandbox: SandboxRef, path: str, *, follow: bool) -> Call[FileInfo]:
        params = {"path": path, **({"follow": "true"} if follow else {})}
        return Call("GET", _sandbox_path(sandbox, "files", "stat"), _model(FileInfo), params=params)

    def _list_files_call(
        self, sandbox: SandboxRef, path: str, *, limit: int | None
    ) -> Call[FileList]:
        params = _without_none(path=path, limit=limit)
        return Call("GET", _sandbox_path(sandbox, "files", "list"), _model(FileList), params=params)

    def _make_dir_call(
        self, sandbox: SandboxRef, path: str, *, parents: bool, mode: int
    ) -> Call[FileInfo]:
        body = {"path": path, "parents": parents, "mode": mode}
        return Call("POST", _sandbox_path(sandbox, "files", "mkdir"), _model(FileInfo), json=body)

    def _move_file_call(
        self, sandbox: SandboxRef, source: str, destination: str, *, overwrite: bool
    ) -> Call[FileInfo]:
        body = {"source": source, "destination": destination, "overwrite": overwrite}
        return Call("POST", _sandbox_path(sandbox, "files", "move"), _model(FileInfo), json=body)

    def _delete_file_call(self, sandbox: SandboxRef, path: str, *, recursive: bool) -> Call[None]:
        params = {"path": path, **({"recursive": "true"} if recursive else {})}
        return Call("DELETE", _sandbox_path(sandbox, "files"), _nothing, params=params)

    def _write_file_call(
        self, sandbox: SandboxRef, path: str, content: Any, *, mode: int | None
    ) -> Call[FileInfo]:
        params = {"path": path, **({"mode": format(mode, "04o")} if mode is not None else {})}
        return Call(
            "PUT",
            _sandbox_path(sandbox, "files"),
            _model(FileInfo),
            params=params,
            content=content,
            headers={"content-type": "application/octet-stream"},
            timeout=self._transfer_timeout(),
        )

    def _upload_archive_call(
        self, sandbox: SandboxRef, path: str, content: Any
    ) -> Call[ArchiveUploaded]:
        return Call(
            "PUT",
            _sandbox_path(sandbox, "archive"),
            _model(ArchiveUploaded),
            params={"path": path},
            content=content,
            headers={"content-type": "application/gzip"},
            timeout=self._transfer_timeout(),
        )

    def _transfer_timeout(self) -> httpx.Timeout:
        """Uploads: the answer comes once the sandbox has written everything (no read limit)."""
        return httpx.Timeout(
            connect=self.timeout.connect,
            read=None,
            write=self.timeout.write,
            pool=self.timeout.pool,
        )

    # --- code runs -----------------------------------------------------------------------------

    def _run_code_call(
        self,
        sandbox: SandboxRef,
        code: str | None,
        *,
        language: str,
        path: str | None,
        args: Iterable[str] | None,
        env: Mapping[str, str] | None,
        cwd: str | None,
        stdin: str | None,
        timeout_ms: int | None,
        max_output_bytes: int | None,
    ) -> Call[RunResult]:
        body = _without_none(
            language=language,
            code=code,
            path=path,
            args=None if args is None else list(args),
            env=_dict_or_none(env),
            cwd=cwd,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
        )
        return Call(
            "POST",
            _sandbox_path(sandbox, "run"),
            _model(RunResult),
            json=body,
            timeout=self._waiting_timeout(timeout_ms),
        )

    def _create_token_call(
        self,
        *,
        name: str | None,
        scopes: Iterable[Scope | str] | None,
        sandbox_ids: Iterable[SandboxRef] | None,
        expires_in_seconds: int | None,
    ) -> Call[TokenCreated]:
        body = _without_none(
            name=name,
            scopes=None if scopes is None else [_enum_value(s) for s in scopes],
            sandbox_ids=None if sandbox_ids is None else [_ref(s) for s in sandbox_ids],
            expires_in_seconds=expires_in_seconds,
        )
        return Call("POST", "/v1/tokens", _model(TokenCreated), json=body)

    def _list_tokens_pager(self) -> Pager[Token]:
        def make_call(cursor: str | None, size: int) -> Call[Page[Token]]:
            params = _without_none(limit=size, cursor=cursor)
            return Call("GET", "/v1/tokens", _model(Page[Token]), params=params)

        return Pager(make_call, None)

    def _list_audit_pager(
        self,
        *,
        token: str | None,
        action: str | None,
        target: str | None,
        result: str | None,
        since: datetime | str | None,
        until: datetime | str | None,
        limit: int | None,
    ) -> Pager[AuditEntry]:
        def make_call(cursor: str | None, size: int) -> Call[Page[AuditEntry]]:
            params = _without_none(
                limit=size,
                cursor=cursor,
                token=token,
                action=action,
                target=target,
                result=result,
                since=_timestamp(since),
                until=_timestamp(until),
            )
            return Call("GET", "/v1/audit", _model(Page[AuditEntry]), params=params)

        return Pager(make_call, limit)

    def _delete_token_call(self, token: str | Token) -> Call[None]:
        return Call("DELETE", f"/v1/tokens/{_segment(_ref(token))}", _nothing)

    def _list_nodes_call(self) -> Call[Page[Node]]:
        return Call("GET", "/v1/nodes", _model(Page[Node]))

    def _get_node_call(self, node: str | Node) -> Call[Node]:
        return Call("GET", f"/v1/nodes/{_segment(_node_id(node))}", _model(Node))

    def _drain_node_call(self, node: str | Node, drain: bool) -> Call[Node]:
        action = "drain" if drain else "undrain"
        return Call("POST", f"/v1/nodes/{_segment(_node_id(node))}/{action}", _model(Node))

    def _create_volume_call(
        self,
        name: str,
        *,
        size_mb: int | None,
        node: str | None,
        labels: Mapping[str, str] | None,
    ) -> Call[Volume]:
        body = _without_none(name=name, size_mb=size_mb, node=node, labels=_dict_or_none(labels))
        return Call("POST", "/v1/volumes", _model(Volume), json=body)

    def _list_volumes_call(self) -> Call[Page[Volume]]:
        return Call("GET", "/v1/volumes", _model(Page[Volume]))

    def _get_volume_call(self, volume: str | Volume) -> Call[Volume]:
        return Call("GET", f"/v1/volumes/{_segment(_volume_ref(volume))}", _model(Volume))

    def _delete_volume_call(self, volume: str | Volume) -> Call[None]:
        return Call("DELETE", f"/v1/volumes/{_segment(_volume_ref(volume))}", _nothing)

    def _create_webhook_call(
        self,
        url: str,
        events: Iterable[str],
        *,
        sandbox: SandboxRef | None,
        secret: str | None,
    ) -> Call[Webhook]:
        body = _without_none(
            url=url,
            events=list(events),
            sandbox=None if sandbox is None else _ref(sandbox),
            secret=secret,
        )
        return Call("POST", "/v1/webhooks", _model(Webhook), json=body)

    def _list_webhooks_call(self) -> Call[list[Webhook]]:
        return Call("GET", "/v1/webhooks", _model_list(Webhook))

    def _get_webhook_call(self, webhook: str | Webhook) -> Call[Webhook]:
        return Call("GET", f"/v1/webhooks/{_segment(_webhook_ref(webhook))}", _model(Webhook))

    def _delete_webhook_call(self, webhook: str | Webhook) -> Call[Webhook]:
        return Call("DELETE", f"/v1/webhooks/{_segment(_webhook_ref(webhook))}", _model(Webhook))

    def _webhook_deliveries_pager(
        self, webhook: str | Webhook, limit: int | None
    ) -> Pager[WebhookAttempt]:
        path = f"/v1/webhooks/{_segment(_webhook_ref(webhook))}/deliveries"

        def make_call(cursor: str | None, size: int) -> Call[Page[WebhookAttempt]]:
            params = _without_none(limit=size, cursor=cursor)
            return Call("GET", path, _model(Page[WebhookAttempt]), params=params)

        return Pager(make_call, limit)

    def _create_snapshot_call(
        self,
        sandbox: SandboxRef,
        *,
        name: str | None,
        expires_in: int | None,
        expires_at: datetime | None,
        labels: Mapping[str, str] | None,
    ) -> Call[Snapshot]:
        body = _without_none(
            name=name,
            expires_in=expires_in,
            expires_at=None if expires_at is None else expires_at.isoformat(),
            labels=_dict_or_none(labels),
        )
        return Call("POST", _sandbox_path(sandbox, "snapshots"), _model(Snapshot), json=body)

    def _list_snapshots_pager(
        self, *, sandbox: SandboxRef | None, limit: int | None
    ) -> Pager[Snapshot]:
        def make_call(cursor: str | None, size: int) -> Call[Page[Snapshot]]:
            params = _without_none(
                limit=size, cursor=cursor, sandbox=None if sandbox is None else _ref(sandbox)
            )
            return Call("GET", "/v1/snapshots", _model(Page[Snapshot]), params=params)

        return Pager(make_call, limit)

    def _get_snapshot_call(self, snapshot: str | Snapshot) -> Call[Snapshot]:
        return Call("GET", f"/v1/snapshots/{_segment(_snapshot_ref(snapshot))}", _model(Snapshot))

    def _delete_snapshot_call(self, snapshot: str | Snapshot) -> Call[None]:
        return Call("DELETE", f"/v1/snapshots/{_segment(_snapshot_ref(snapshot))}", _nothing)

    def _fork_call(self, sandbox: SandboxRef, **options: Any) -> Call[Sandbox]:
        """A create's body, sent to the source sandbox's fork."""
        create = self._create_sandbox_call(**options)
        return Call("POST", _sandbox_path(sandbox, "fork"), create.parse, json=create.json)

    def _pull_image_call(
        self,
        reference: str,
        *,
        username: str | None,
        password: str | None,
        token: str | None,
        node: str | None,
    ) -> Call[Image]:
        auth = _without_none(username=username, password=password, token=token) or None
        body = _without_none(reference=reference, auth=auth, node=node)
        return Call(
            "POST", "/v1/images", _model(Image), json=body, timeout=self._transfer_timeout()
        )

    def _import_image_call(
        self, content: Any, *, reference: str | None, node: str | None
    ) -> Call[Image]:
        return Call(
            "POST",
            "/v1/images/import",
            _model(Image),
            params=_without_none(reference=reference, node=node),
            content=content,
            headers={"content-type": "application/x-tar"},
            timeout=self._transfer_timeout(),
        )

    # --- ports -------------------------------------------------------------------------------

    def _expose_port_call(self, sandbox: SandboxRef, port: int, public: bool) -> Call[Port]:
        body = {"port": port, "public": public}
        return Call("POST", _sandbox_path(sandbox, "ports"), _model(Port), json=body)

    def _list_ports_call(self, sandbox: SandboxRef) -> Call[list[Port]]:
        parse = pydantic.TypeAdapter(list[Port]).validate_json
        return Call("GET", _sandbox_path(sandbox, "ports"), lambda r: parse(r.content))

    def _unexpose_port_call(self, sandbox: SandboxRef, port: int) -> Call[Port]:
        return Call("DELETE", _sandbox_path(sandbox, "ports", str(port)), _model(Port))

    def _signed_port_url_call(
        self, sandbox: SandboxRef, port: int, expires_in: int
    ) -> Call[PortUrl]:
        def parse(response: httpx.Response) -> PortUrl:
            signed = PortUrl.model_validate_json(response.content)
            # The path form is relative to the API: made absolute for the caller.
            return signed.model_copy(update={"url": self.base_url.rstrip("/") + signed.url})

        body = {"port": port, "expires_in": expires_in}
        return Call("POST", _sandbox_path(sandbox, "port-urls"), parse, json=body)

    def _list_images_call(self, node: str | None) -> Call[Page[Image]]:
        return Call("GET", "/v1/images", _model(Page[Image]), params=_without_none(node=node))

    def _get_image_call(self, image: str | Image, node: str | None) -> Call[Image]:
        params = _without_none(node=node if node is not None else _image_node(image))
        return Call(
            "GET", f"/v1/images/{_segment(_image_ref(image))}", _model(Image), params=params
        )

    def _delete_image_call(self, image: str | Image, node: str | None) -> Call[None]:
        params = _without_none(node=node if node is not None else _image_node(image))
        return Call("DELETE", f"/v1/images/{_segment(_image_ref(image))}", _nothing, params=params)


# --- helpers -----------------------------------------------------------------------------------


def _image_ref(image: str | Image) -> str:
    return image.id if isinstance(image, Image) else image


def _image_node(image: str | Image) -> str | None:
    return image.node_id if isinstance(image, Image) else None


def _volume_ref(volume: str | Volume) -> str:
    return volume.id if isinstance(volume, Volume) else volume


def _snapshot_ref(snapshot: str | Snapshot) -> str:
    return snapshot.id if isinstance(snapshot, Snapshot) else snapshot


def _mount(mount: VolumeMount | Mapping[str, Any]) -> dict[str, Any]:
    """A volume mount as the API takes it: a VolumeMount or a dict of its fields."""
    if isinstance(mount, VolumeMount):
        return mount.model_dump()
    return VolumeMount.model_validate(dict(mount)).model_dump()


def _model(model: type[M]) -> Callable[[httpx.Response], M]:
    def parse(response: httpx.Response) -> M:
        return model.model_validate_json(response.content)

    return parse


def _model_list(model: type[M]) -> Callable[[httpx.Response], list[M]]:
    adapter = pydantic.TypeAdapter(list[model])  # type: ignore[valid-type]

    def parse(response: httpx.Response) -> list[M]:
        return adapter.validate_json(response.content)  # type: ignore[no-any-return]

    return parse


def _webhook_ref(webhook: str | Webhook) -> str:
    return webhook.id if isinstance(webhook, Webhook) else webhook


def _nothing(response: httpx.Response) -> None:
    return None


def _check_base_url(url: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"invalid base URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"invalid base URL {url!r}: expected http(s)://host[:port][/prefix]")
    return url.rstrip("/")


def _node_id(value: str | Node) -> str:
    return value if isinstance(value, str) else value.id


def _ref(value: str | Sandbox | Command | Token) -> str:
    """An id or name, taken from a model when one is given instead of a string."""
    return value if isinstance(value, str) else value.id


def _segment(ref: str) -> str:
    if not ref:
        raise ValueError("an id or name must not be empty")
    if ref in (".", ".."):  # would be resolved as a relative path, not sent as a name
        return ref.replace(".", "%2E")
    return quote(ref, safe="")


def _sandbox_path(sandbox: SandboxRef, *rest: str) -> str:
    parts = [_segment(_ref(sandbox)), *(_segment(part) for part in rest)]
    return "/v1/sandboxes/" + "/".join(parts)


def _enum_value(value: Enum | str | None) -> str | None:
    return value.value if isinstance(value, Enum) else value


def _timestamp(value: datetime | str | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def _dict_or_none(value: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if value is None else dict(value)


def _without_none(**fields: Any) -> dict[str, Any]:
    # Omitted rather than null, so the server's defaults apply.
    return {key: value for key, value in fields.items() if value is not None}


def _signal_value(signal: str | int) -> str | int:
    if isinstance(signal, int):
        return int(signal)
    return signal


def _mode_header(response: httpx.Response) -> int | None:
    """The file mode a download announces (X-Corral-Mode, octal)."""
    value = response.headers.get("x-corral-mode")
    try:
        return int(value, 8) & 0o777 if value else None
    except ValueError:
        return None
