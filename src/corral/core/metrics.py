"""The server's Prometheus series: one registry per server (no process-global state), counted by
the core where things happen and served by `GET /metrics` (api/observe.py).

Series and labels are listed in docs/operations.md. Every label takes a bounded set of values
(route templates, never raw paths; states, statuses, node ids), so the number of series stays
small whatever the traffic. Label children are cached: the hot path pays a dict lookup and an
increment, no formatting and no store query. Sandboxes by state and node and the warm pool are
read at scrape time (`refresh`), one grouped query per scrape.

In a fleet each replica counts its own process: scrape every replica (they are stateless, so a
sum over replicas is the fleet's figure); the sandbox gauges read the shared store and so are
the same on every replica.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Seconds. An exec of `true` in a warm sandbox takes about a millisecond; long commands minutes.
EXEC_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip
CREATE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "corral_http_requests",
            "HTTP requests and WebSocket sessions answered, by route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "corral_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer, by route template",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.exec_seconds = Histogram(
            "corral_exec_duration_seconds",
            "Synchronous command runs (exec), from the request to the stored result",
            ["source"],
            buckets=EXEC_BUCKETS,
            registry=r,
        )
        self.commands = Counter(
            "corral_commands_finished",
            "Commands by final status (completed, failed, timed_out, cancelled, lost)",
            ["status"],
            registry=r,
        )
        self.create_seconds = Histogram(
            "corral_sandbox_create_duration_seconds",
            "Sandbox creates, from the request to a running sandbox; `warm` tells a claim from "
            "the warm pool",
            ["warm"],
            buckets=CREATE_BUCKETS,
            registry=r,
        )
        self.sandboxes = Gauge(
            "corral_sandboxes",
            "Sandboxes that are not deleted, by state and node (read from the store at scrape)",
            ["state", "node"],
            registry=r,
        )
        self.warm_pool = Gauge(
            "corral_warm_pool_sandboxes",
            "Started sandboxes waiting in this process's warm pool",
            registry=r,
        )
        self.stream_bytes = Counter(
            "corral_stream_bytes_sent",
            "Command output bytes sent to clients by stream kind (raw, sse, ndjson, websocket)",
            ["kind"],
            registry=r,
        )
        self.heartbeats = Counter(
            "corral_node_heartbeats",
            "Node heartbeats received, by node and whether they were taken",
            ["node", "result"],
            registry=r,
        )
        self.rate_limited = Counter(
            "corral_rate_limited",
            "Requests refused by a rate limit: a token's budget (token), sign-in attempts (login)",
            ["kind"],
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self._known_sandbox_labels: set[tuple[str, str]] = set()

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # --- what the core and the API count ---

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._child(self.http_requests, method, route, str(status)).inc()
        self._child(self.http_duration, method, route).observe(seconds)

    def exec_done(self, source: str, seconds: float) -> None:
        self._child(self.exec_seconds, source).observe(seconds)

    def command_finished(self, status: str, count: int = 1) -> None:
        self._child(self.commands, status).inc(count)

    def created(self, seconds: float, *, warm: bool) -> None:
        self._child(self.create_seconds, "true" if warm else "false").observe(seconds)

    def streamed(self, kind: str, count: int) -> None:
        self._child(self.stream_bytes, kind).inc(count)

    def heartbeat(self, node: str, taken: bool) -> None:
        self._child(self.heartbeats, node, "taken" if taken else "refused").inc()

    def refused(self, kind: str) -> None:
        self._child(self.rate_limited, kind).inc()

    # --- read at scrape ---

    def refresh(self, sandboxes: Iterable[tuple[str, str, int]], warm_pool: int) -> None:
        """Set the gauges read at scrape: (state, node, count) of every group of sandboxes,
        and the warm pool's size. Groups that emptied since the last scrape read 0."""
        seen = set()
        for state, node, count in sandboxes:
            self.sandboxes.labels(state, node).set(count)
            seen.add((state, node))
        for gone in self._known_sandbox_labels - seen:
            self.sandboxes.labels(*gone).set(0)
        self._known_sandbox_labels |= seen
        self.warm_pool.set(warm_pool)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
