"""HTTP streams that end with the caller's token."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, Callable, Mapping

from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse
from starlette.types import Send

from corral.core.token_watch import TokenEnded, TokenLease


class TokenBoundStream(StreamingResponse):
    """A streamed body that stops when the token that asked for it is revoked or expires: then
    `ending(reason)` (the stream's own last event, if it has one) is sent and the body ends.

    The body is sent from a task of its own, so that a stream waiting for output ends at once;
    the server writes each chunk whole or not at all, so cutting it between chunks is clean.
    """

    def __init__(
        self,
        content: AsyncIterable[bytes | memoryview],
        lease: TokenLease,
        *,
        ending: Callable[[str], bytes] | None = None,
        media_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers, background=background)
        self.lease = lease
        self.ending = ending

    async def stream_response(self, send: Send) -> None:
        with self.lease:
            await send(
                {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
            )  # fmt: skip
            try:
                await self.lease.run(self._body(send))
            except TokenEnded as ended:
                if self.ending is not None:
                    last = self.ending(ended.message)
                    await send({"type": "http.response.body", "body": last, "more_body": True})
            finally:
                closer = getattr(self.body_iterator, "aclose", None)
                if closer is not None:
                    with contextlib.suppress(Exception):
                        await closer()  # its log reader and buffers go at once
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _body(self, send: Send) -> None:
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
