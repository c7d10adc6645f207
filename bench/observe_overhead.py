"""The per-request cost of api/observe.py: a trivial ASGI app called directly, and through
`Observe` (metrics, request id, caller note; the log line off, as at level warning, then on
into a null stream; an audited POST), side by side in one run.

    .venv/bin/python bench/observe_overhead.py
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from types import SimpleNamespace
from typing import Any

from corral.api.observe import Observe
from corral.core.audit import AuditLog
from corral.core.metrics import Metrics

N = int(__import__("os").environ.get("BENCH_N", "20000"))


class Route:
    path = "/v1/sandboxes/{sandbox}/exec"

    @staticmethod
    def endpoint() -> None: ...


ROUTE = Route()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    scope["route"] = ROUTE
    scope["path_params"] = {"sandbox": "sb_x"}
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def scope(method: str, services: Any) -> dict[str, Any]:
    return {
        "type": "http", "method": method, "path": "/v1/sandboxes/sb_x/exec", "headers": [],
        "query_string": b"", "client": ("127.0.0.1", 1), "app": SimpleNamespace(
            state=SimpleNamespace(services=services)),
    }  # fmt: skip


async def per_call(handler: Any, method: str, services: Any) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(_message: dict[str, Any]) -> None:
        return None

    started = time.perf_counter()
    for _ in range(N):
        await handler(scope(method, services), receive, send)
    return (time.perf_counter() - started) / N * 1e6


async def main() -> None:
    audit = AuditLog(None, None)  # type: ignore[arg-type]  # queued only, never flushed here
    services = SimpleNamespace(metrics=Metrics(), audit=audit)
    observed = Observe(app, stream=io.StringIO())
    log = logging.getLogger("corral.request")
    bare = await per_call(app, "GET", services)
    log.setLevel(logging.WARNING)
    quiet = await per_call(observed, "GET", services)
    log.setLevel(logging.INFO)
    logged = await per_call(observed, "GET", services)
    audited = await per_call(observed, "POST", services)
    print(f"bare app               {bare:7.1f} us/request")
    print(f"observed, no log line  {quiet:7.1f} us/request (+{quiet - bare:.1f})")
    print(f"observed, JSON line    {logged:7.1f} us/request (+{logged - bare:.1f})")
    print(f"observed, line + audit {audited:7.1f} us/request (+{audited - bare:.1f})")


if __name__ == "__main__":
    asyncio.run(main())
