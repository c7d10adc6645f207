"""ASGI middleware: the request body limit (request ids are api/observe.py's)."""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.api.errors import Problem, problem_response

# Routes that stream their bodies to a sandbox and enforce their own limits (uploads count the
# bytes against `max_upload_bytes` as they arrive; stdin has no limit but back-pressure).
STREAMING_BODY_ROUTES: tuple[re.Pattern[str], ...] = (
    re.compile(r"/v1/sandboxes/[^/]+/(archive|files)"),
    re.compile(r"/v1/sandboxes/[^/]+/commands/[^/]+/stdin"),
    re.compile(r"/v1/vms/[^/]+/files/upload"),  # run-dat-sheesh face
    re.compile(r"/v1/runtimes/[^/]+/files"),  # Runta face
    re.compile(r"/v2/sandboxes/sessions/[^/]+/fs/write"),  # Vercel face
    re.compile(r"/v1/images/import"),  # image archives, up to max_image_bytes
)


class RequestContext:
    """Bounds each request's body.

    Routes that stream large bodies (file uploads) are exempt, by path prefix (`exempt`) or by a
    pattern matching the whole path (`exempt_patterns`), and enforce their own limits.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        exempt: tuple[str, ...] = (),
        exempt_patterns: tuple[re.Pattern[str], ...] = STREAMING_BODY_ROUTES,
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.exempt = exempt
        self.exempt_patterns = exempt_patterns

    def _exempt(self, path: str) -> bool:
        if self.exempt and path.startswith(self.exempt):
            return True
        return any(pattern.fullmatch(path) for pattern in self.exempt_patterns)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send_with_id = send  # Observe, in front, adds the request's id to the answer
        limit = self.max_body
        if self._exempt(scope["path"]):
            await self.app(scope, receive, send_with_id)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _reject(scope, receive, send_with_id, limit)
                    return
        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"the request body exceeds {limit} bytes")
            return message

        await self.app(scope, bounded_receive, send_with_id)


async def _reject(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    """413 before the body is read, in the shape of the API the path belongs to."""
    problem = Problem(413, "payload_too_large", f"the request body exceeds {limit} bytes")
    response = problem_response(Request(scope, receive), problem)
    response.headers["connection"] = "close"  # the unread body would follow on this connection
    await response(scope, receive, send)
