"""The blocking client. `AsyncClient` mirrors it method for method."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from types import TracebackType
from typing import TypeVar

import httpx
import pydantic

from corral.client._base import (
    DEFAULT_TIMEOUT,
    BaseClient,
    Call,
    CommandRef,
    Pager,
    SandboxRef,
    TimeoutValue,
)
from corral.client._exceptions import ClientClosedError, map_httpx_errors
from corral.core.models import (
    Command,
    CommandStatus,
    Health,
    Sandbox,
    SandboxState,
    Scope,
    Token,
    TokenCreated,
)

T = TypeVar("T")
M = TypeVar("M", bound=pydantic.BaseModel)


class Client(BaseClient):
    """A connection pool to one Corral server.

    `base_url` defaults to `$CORRAL_URL`, then `http://127.0.0.1:8700`; `token` to `$CORRAL_TOKEN`.
    `timeout` (seconds, or an `httpx.Timeout`) bounds each request, except that `exec` and waiting
    `get_command` calls get the command's own deadline plus a margin. Pass `transport` to route
    requests elsewhere, e.g. `httpx.MockTransport` in tests.

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
    ) -> None:
        super().__init__(base_url=base_url, token=token, timeout=timeout, headers=headers)
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
        with map_httpx_errors():
            response = self._http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                timeout=call.timeout if call.timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        return self._parse(call, response)

    def _collect(self, pager: Pager[M]) -> list[M]:
        while (call := pager.next_call()) is not None:
            pager.feed(self._send(call))
        return pager.items

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
    ) -> Sandbox:
        """Create a sandbox; options left out take the server's defaults."""
        call = self._create_sandbox_call(
            name=name,
            template=template,
            env=env,
            labels=labels,
            cpu=cpu,
            memory_mb=memory_mb,
            pids=pids,
            disk_mb=disk_mb,
            ttl_seconds=ttl_seconds,
        )
        return self._send(call)

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
        stdin: str | None = None,
        timeout_ms: int | None = None,
        max_output_bytes: int | None = None,
    ) -> Command:
        """Run a command and wait for its end.

        `command` is a shell string, or the program when `args` is given (no shell). A non-zero
        exit is a result, not an error; see `corral.raise_for_status`.
        """
        call = self._exec_call(
            sandbox,
            command,
            args=args,
            cwd=cwd,
            env=env,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
            background=False,
        )
        return self._send(call)

    def start_command(
        self,
        sandbox: SandboxRef,
        command: str,
        *,
        args: Iterable[str] | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
        timeout_ms: int | None = None,
        max_output_bytes: int | None = None,
    ) -> Command:
        """Start a command without waiting; follow it with `get_command(..., wait=True)`."""
        call = self._exec_call(
            sandbox,
            command,
            args=args,
            cwd=cwd,
            env=env,
            stdin=stdin,
            timeout_ms=timeout_ms,
            max_output_bytes=max_output_bytes,
            background=True,
        )
        return self._send(call)

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

    # --- tokens --------------------------------------------------------------------------------

    def create_token(
        self,
        *,
        name: str | None = None,
        scopes: Iterable[Scope | str] | None = None,
        sandbox_ids: Iterable[SandboxRef] | None = None,
        expires_in_seconds: int | None = None,
    ) -> TokenCreated:
        """Create a token; its `secret` is in this response only."""
        call = self._create_token_call(
            name=name,
            scopes=scopes,
            sandbox_ids=sandbox_ids,
            expires_in_seconds=expires_in_seconds,
        )
        return self._send(call)

    def list_tokens(self) -> list[Token]:
        """Every token (without secrets)."""
        return self._collect(self._list_tokens_pager())

    def delete_token(self, token_id: str | Token) -> None:
        """Revoke a token at once."""
        self._send(self._delete_token_call(token_id))
