"""Domain errors. Each carries a stable code and the HTTP status the native API gives it;
faces map the same errors onto their own shapes."""

from __future__ import annotations

from typing import Any


class CorralError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(CorralError):
    status, code = 400, "bad_request"


class Unauthenticated(CorralError):
    status, code = 401, "unauthenticated"


class PermissionDenied(CorralError):
    status, code = 403, "permission_denied"


class NotFound(CorralError):
    status, code = 404, "not_found"


class Conflict(CorralError):
    status, code = 409, "conflict"


class PayloadTooLarge(CorralError):
    status, code = 413, "payload_too_large"


class InvalidArgument(CorralError):
    status, code = 422, "invalid_argument"


class RateLimited(CorralError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class BadGateway(CorralError):
    """What stands behind the server (a sandbox's service) did not answer as it should."""

    status, code = 502, "bad_gateway"


class Unavailable(CorralError):
    status, code = 503, "unavailable"


class SandboxNotRunning(Conflict):
    code = "sandbox_not_running"
