"""`corral serve` or `corral agent` with timers around their stages (for bench.trace_fleet).

    python bench/trace_fleet_hooks.py serve|agent ARGS...

Runs the CLI of whatever `corral` PYTHONPATH gives (the run's copy of the source), after
wrapping, at run time, the calls an exec goes through on a replica and on an agent: node calls
over NATS by operation, node events by kind, the store's statements, pool checkouts and new
connections. SIGUSR1 writes what was timed since the last one to
$CORRAL_TRACE_DIR/<pid>.json (label -> list of seconds) and starts again. Nothing in the
source is changed.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import os
import signal
import sys
import time
from typing import Any

sys.path.pop(0)  # bench/ itself: nothing of it is imported here

DURATIONS: dict[str, list[float]] = collections.defaultdict(list)


def _record(label: str, t0: float) -> None:
    DURATIONS[label].append(time.perf_counter() - t0)


def wrap(owner: Any, attr: str, label: str | None = None, *, by_arg: int | None = None) -> None:
    """Time owner.attr (sync or async). With `by_arg`, the label also names that positional
    argument (a node call's operation, an event's kind)."""
    fn = owner.__dict__.get(attr)
    if fn is None:
        return
    name = label or f"{owner.__name__}.{attr}"

    def label_of(a: tuple[Any, ...], k: dict[str, Any]) -> str:
        if by_arg is not None and len(a) > by_arg:
            return f"{name}: {a[by_arg]}"
        return name

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def timed_async(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*a, **k)
            finally:
                _record(label_of(a, k), t0)

        setattr(owner, attr, timed_async)
    else:

        @functools.wraps(fn)
        def timed_sync(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _record(label_of(a, k), t0)

        setattr(owner, attr, timed_sync)


def install(role: str) -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool, QueuePool

    from corral.core import commands, node_events, results, sandboxes, tokens
    from corral.node import agent, bus, directory, local, remote
    from corral.store import writer

    # The store: each statement (by its first words), each checkout from the pool (a wait when
    # the pool is exhausted), each new connection to the server.
    @event.listens_for(Engine, "before_cursor_execute")
    def before(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        conn.info.setdefault("trace_t0", []).append(time.perf_counter())

    @event.listens_for(Engine, "after_cursor_execute")
    def after(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
        words = " ".join(statement.split()[:4])[:48]
        _record(f"sql: {words}", conn.info["trace_t0"].pop())

    @event.listens_for(Pool, "connect")
    def connected(dbapi_conn: Any, record: Any) -> None:
        DURATIONS["db: new connection to the server"].append(0.0)

    wrap(QueuePool, "_do_get", "db: pool checkout (incl. a new connection)")
    wrap(bus.Bus, "request_data", "nats request", by_arg=2)  # self, subject, op
    wrap(bus.Bus, "_answer", "nats: answering a request (any)")
    if role == "serve":
        wrap(tokens.TokenService, "authenticate")
        wrap(sandboxes.SandboxService, "row")
        wrap(sandboxes.SandboxService, "running_row")
        wrap(directory.NodeDirectory, "get")
        wrap(commands.CommandService, "run", "CommandService.run (whole exec)")
        wrap(commands.CommandService, "start")
        wrap(commands.CommandService, "_insert", "CommandService._insert (group commit)")
        wrap(commands.CommandService, "_finish")
        wrap(commands.CommandService, "output")
        wrap(writer.BatchWriter, "_write", "BatchWriter._write (one batch)")
        wrap(remote.RemoteNode, "run", "RemoteNode.run (until started)")
        wrap(remote.RemoteNode, "running_count")
        wrap(remote.RemoteNode, "output")
        wrap(remote.RemoteExecution, "outcome", "RemoteExecution.outcome (until stored)")
        wrap(results.CommandResults, "wait_row")
        wrap(results.CommandResults, "_row", "CommandResults._row (read)")
        wrap(results.CommandResults, "announce")
        wrap(node_events.NodeEvents, "_handle", "replica: node event", by_arg=2)
        wrap(node_events.NodeEvents, "_epoch")
    else:
        wrap(agent.NodeAgent, "_handle", "agent: node call", by_arg=1)  # self, op
        wrap(agent.NodeAgent, "_deliver", "agent: deliver one event (until acknowledged)")
        wrap(agent.NodeAgent, "_flush_outbox", "agent: flush the outbox (a batch of events)")
        wrap(local.LocalNode, "run", "LocalNode.run (until started)")
        wrap(local.LocalExecution, "outcome", "LocalExecution.outcome")


def dump(signum: int, frame: Any) -> None:
    out = os.path.join(os.environ["CORRAL_TRACE_DIR"], f"{os.getpid()}.json")
    data = {k: list(v) for k, v in DURATIONS.items()}
    DURATIONS.clear()
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, out)


def main() -> None:
    role = sys.argv[1]
    install(role)
    signal.signal(signal.SIGUSR1, dump)
    from corral.cli.main import main as cli

    sys.argv = ["corral", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
