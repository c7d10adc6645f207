"""Exceptions raised by the Corral SDK.

Every exception derives from `CorralError`; each also derives from the builtin it resembles, so
`except TimeoutError` or `except LookupError` works as one would expect:

* CorralError
  + ConfigError (ValueError) - an unusable base URL
  + ClientClosedError (RuntimeError) - a request on a closed client
  + TransportError (ConnectionError) - the server could not be reached or the exchange broke
    - ConnectError
    - TransportTimeout (TimeoutError)
      . ConnectTimeout
      . ReadTimeout
      . WriteTimeout
      . PoolTimeout
  + DecodingError - a success response whose body is not what the API promises
  + APIError - the server answered with an error status
    - BadRequestError (ValueError) - 400
    - AuthenticationError - 401
    - PermissionDeniedError (PermissionError) - 403
    - NotFoundError (LookupError) - 404
    - ConflictError - 409
      . SandboxNotRunningError
    - PayloadTooLargeError - 413
    - ValidationError (ValueError) - 422
    - RateLimitError - 429
    - ServerError - 5xx
      . UnavailableError - 503
  + CommandError - raised by `raise_for_status` for a command that did not exit 0
  + ArchiveError (ValueError) - an archive downloaded from a sandbox was refused or damaged

A command that exits non-zero is a result, not an error: only `raise_for_status` turns it into one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import pydantic

from corral.core.models import Command, CommandStatus, ErrorResponse

__all__ = [
    "APIError",
    "ArchiveError",
    "AuthenticationError",
    "BadRequestError",
    "ClientClosedError",
    "CommandError",
    "ConfigError",
    "ConflictError",
    "ConnectError",
    "ConnectTimeout",
    "CorralError",
    "DecodingError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PoolTimeout",
    "RateLimitError",
    "ReadTimeout",
    "SandboxNotRunningError",
    "ServerError",
    "TransportError",
    "TransportTimeout",
    "UnavailableError",
    "ValidationError",
    "WriteTimeout",
    "raise_for_status",
]


class CorralError(Exception):
    """Root of every exception the SDK raises."""

    def __init__(self, message: str) -> None:
        # One argument only: OSError-based subclasses read two as (errno, strerror).
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(CorralError, ValueError):
    """The client was configured with an unusable value, such as a malformed base URL."""


class ClientClosedError(CorralError, RuntimeError):
    """A request was made on a client after `close()`."""


# --- transport ---------------------------------------------------------------------------------


class TransportError(CorralError, ConnectionError):
    """The request did not get an HTTP answer: connection refused, reset, timed out, ..."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class ConnectError(TransportError):
    """The connection to the server could not be opened."""


class TransportTimeout(TransportError, TimeoutError):
    """A network operation took longer than the client's timeout."""


class ConnectTimeout(TransportTimeout):
    """Opening the connection timed out."""


class ReadTimeout(TransportTimeout):
    """The server did not answer in time (for exec and waits, beyond the command's own deadline)."""


class WriteTimeout(TransportTimeout):
    """Sending the request timed out."""


class PoolTimeout(TransportTimeout):
    """No pooled connection became free in time."""


class DecodingError(CorralError):
    """A success response whose body does not match the API's model (a proxy or version skew)."""

    def __init__(self, message: str, *, response: httpx.Response) -> None:
        super().__init__(message)
        self.response = response


_TIMEOUTS: tuple[tuple[type[httpx.TimeoutException], type[TransportTimeout]], ...] = (
    (httpx.ConnectTimeout, ConnectTimeout),
    (httpx.ReadTimeout, ReadTimeout),
    (httpx.WriteTimeout, WriteTimeout),
    (httpx.PoolTimeout, PoolTimeout),
)


@contextlib.contextmanager
def map_httpx_errors() -> Iterator[None]:
    """Translate httpx's exceptions into ours so that callers never need to import httpx."""
    try:
        yield
    except httpx.InvalidURL as exc:
        raise ConfigError(f"invalid URL: {exc}") from exc
    except httpx.UnsupportedProtocol as exc:
        raise ConfigError(f"unsupported URL: {exc}") from exc
    except httpx.TimeoutException as exc:
        url = _request_url(exc)
        error_type = next((ours for theirs, ours in _TIMEOUTS if isinstance(exc, theirs)), None)
        error_type = error_type or TransportTimeout
        kind = error_type.__name__.removesuffix("Timeout").lower() or "request"
        raise error_type(_describe(f"{kind} timeout on", url, exc), url=url) from exc
    except httpx.ConnectError as exc:
        url = _request_url(exc)
        raise ConnectError(_describe("cannot connect to", url, exc), url=url) from exc
    except httpx.HTTPError as exc:
        url = _request_url(exc)
        raise TransportError(_describe("request failed to", url, exc), url=url) from exc


def _request_url(exc: httpx.HTTPError) -> str | None:
    try:
        return str(exc.request.url.copy_with(query=None))
    except RuntimeError:  # httpx raises when the error has no request attached
        return None


def _describe(what: str, url: str | None, exc: Exception) -> str:
    message = f"{what} {url or 'the server'}"
    reason = str(exc)
    return f"{message}: {reason}" if reason else message


# --- API errors --------------------------------------------------------------------------------


class APIError(CorralError):
    """The server answered with an error status and, normally, a typed error body."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str,
        details: Any = None,
        request_id: str | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.details = details
        self.request_id = request_id
        self.response = response

    def __str__(self) -> str:
        return f"{self.status_code} {self.code}: {self.message}"

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        """The exception for an error response, of the class its code or status selects."""
        code, message, details, request_id = _error_fields(response)
        error_class = _CLASS_BY_CODE.get(code) or _class_for_status(response.status_code)
        error = error_class(
            message,
            status_code=response.status_code,
            code=code,
            details=details,
            request_id=request_id,
            response=response,
        )
        if isinstance(error, RateLimitError):
            error.retry_after = _retry_after(response)
        return error


class BadRequestError(APIError, ValueError):
    """400: the request could not be read (malformed JSON, bad parameters)."""


class AuthenticationError(APIError):
    """401: no token, or a token that is unknown, revoked or expired."""


class PermissionDeniedError(APIError, PermissionError):
    """403: the token lacks the scope (a sandbox it is not limited to is a 404, as a missing
    one)."""


class NotFoundError(APIError, LookupError):
    """404: no such sandbox, command or token."""


class ConflictError(APIError):
    """409: the request clashes with the current state (a taken name, a finished command, ...)."""


class SandboxNotRunningError(ConflictError):
    """409 `sandbox_not_running`: the sandbox must be started before it can run commands."""


class PayloadTooLargeError(APIError):
    """413: the request body is above the server's limit."""


class ValidationError(APIError, ValueError):
    """422: a field is invalid; `details` lists which and why."""


class RateLimitError(APIError):
    """429: too many requests for this token; retry after `retry_after` seconds (if known)."""

    retry_after: float | None = None


class ServerError(APIError):
    """5xx: the server failed; the request may be retried."""


class UnavailableError(ServerError):
    """503: the server or the sandbox's node is not available right now."""


_CLASS_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: RateLimitError,
    503: UnavailableError,
}

_CLASS_BY_CODE: dict[str, type[APIError]] = {
    "sandbox_not_running": SandboxNotRunningError,
}

# Codes for bodies that are not ours (a proxy's HTML page, an empty 502).
_CODE_BY_STATUS: dict[int, str] = {
    400: "bad_request",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_argument",
    429: "rate_limited",
    503: "unavailable",
}


def _class_for_status(status_code: int) -> type[APIError]:
    if status_code in _CLASS_BY_STATUS:
        return _CLASS_BY_STATUS[status_code]
    return ServerError if status_code >= 500 else APIError


def _error_fields(response: httpx.Response) -> tuple[str, str, Any, str | None]:
    header_request_id = response.headers.get("x-request-id")
    try:
        body = ErrorResponse.model_validate_json(response.content)
    except pydantic.ValidationError:
        code = _CODE_BY_STATUS.get(response.status_code, f"http_{response.status_code}")
        text = response.text.strip()
        message = text[:500] if text else (response.reason_phrase or "error")
        return code, message, None, header_request_id
    error = body.error
    return error.code, error.message, error.details, body.request_id or header_request_id


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:  # the HTTP-date form; the server sends seconds
        return None


# --- local archives ----------------------------------------------------------------------------


class ArchiveError(CorralError, ValueError):
    """A directory downloaded from a sandbox could not be extracted here: an entry that would
    land outside the destination (`code` "unsafe_archive"), over a limit ("too_large"), in the
    way of what is there ("conflict"), or a damaged stream ("bad_archive"). Entries extracted
    before it stay."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


# --- command results ---------------------------------------------------------------------------


class CommandError(CorralError):
    """A command did not complete with exit code 0. Raised only by `raise_for_status`."""

    def __init__(self, message: str, *, command: Command) -> None:
        super().__init__(message)
        self.command = command

    @property
    def status(self) -> CommandStatus:
        return self.command.status

    @property
    def exit_code(self) -> int | None:
        return self.command.exit_code


def raise_for_status(command: Command) -> Command:
    """Return `command` if it completed with exit code 0, else raise `CommandError`.

    Unfinished commands raise too: they have not completed.
    """
    if command.status is CommandStatus.completed and command.exit_code == 0:
        return command
    raise CommandError(_command_failure(command), command=command)


def _command_failure(command: Command) -> str:
    prefix = f"command {command.id}"
    status = command.status
    if status is CommandStatus.completed:
        if command.exit_code is None and command.signal is not None:
            return f"{prefix} was killed by signal {command.signal}"
        return f"{prefix} exited with code {command.exit_code}"
    if status is CommandStatus.timed_out:
        return f"{prefix} timed out after {command.timeout_ms} ms"
    if status is CommandStatus.cancelled:
        return f"{prefix} was cancelled"
    if status in (CommandStatus.failed, CommandStatus.lost):
        reason = f": {command.error}" if command.error else ""
        verb = "failed to start" if status is CommandStatus.failed else "was lost"
        return f"{prefix} {verb}{reason}"
    return f"{prefix} has not finished (status {status.value})"
