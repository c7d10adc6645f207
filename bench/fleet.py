"""The fleet under test: API replicas on a throwaway PostgreSQL and nats-server, and one agent
serving its node over NATS, all from the run's copy of the source.

PostgreSQL and NATS come from tests/engines.py (the same classes the fleet tests use; they need
nothing but the standard library). The agent gets its own uid block, cgroup name and data dir,
as the bench's server does; `FleetRig.close()` stops and removes everything it started, also
after a failure halfway through `start()`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from tests.engines import NatsServer, NatsUser, PostgresCluster

from bench.common import (
    PYTHON,
    LeanSyncConnection,
    Sample,
    Server,
    free_port,
    make_data_dir,
    percentile,
    proc_cpu_seconds,
    remove_cgroups,
    unmount_under,
)

NODE_ID = "bench-agent"
PG_COUNTERS = ("sessions", "xact_commit", "xact_rollback", "tup_returned", "tup_inserted",
               "tup_updated")  # fmt: skip
NATS_COUNTERS = ("in_msgs", "out_msgs", "in_bytes")


class MonitoredNats(NatsServer):
    """nats-server with its monitoring port on, for its message counters (/varz)."""

    def __init__(self, users: list[NatsUser]) -> None:
        super().__init__(users)
        self.monitor_port = free_port()

    def _write_config(self) -> Path:
        path = super()._write_config()
        config = json.loads(path.read_text())
        config["http"] = f"127.0.0.1:{self.monitor_port}"
        path.write_text(json.dumps(config, indent=2))
        return path

    def counters(self) -> dict[str, float]:
        varz = httpx.get(f"http://127.0.0.1:{self.monitor_port}/varz", timeout=5).json()
        return {f"nats_{k}": float(varz[k]) for k in NATS_COUNTERS}


def node_permissions(src: Path, node_id: str) -> dict[str, Any]:
    """A node's NATS permissions as the run's copy of the source defines them."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from corral.node.bus import node_permissions;"
        "print(json.dumps(node_permissions(sys.argv[2])))"
    )
    out = subprocess.run(
        [PYTHON, "-c", code, str(src), node_id],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return dict(json.loads(out.stdout))


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its direct children (PostgreSQL: the postmaster and its
    backends), the children that ended included (their time is in the parent's cutime and
    cstime once it has reaped them)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            if int(entry.name) == pid:
                total += sum(int(f) for f in fields[11:15]) / ticks
            elif int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, ValueError, IndexError):
            continue
    return total


class Agent:
    """`python -m corral agent` from the run's copy of the source."""

    def __init__(
        self,
        *,
        src: Path,
        nats_url: str,
        uid_base: int,
        uid_count: int,
        env: dict[str, str] | None = None,
        launcher: list[str] | None = None,
    ) -> None:
        self.src = src
        self.launcher = launcher or [PYTHON, "-m", "corral"]
        self.nats_url = nats_url
        self.data_dir = make_data_dir("corral-bench-agent-")
        self.cgroup_name = f"corral-bench-{os.getpid()}-agent-{self.data_dir.name[-8:]}"
        self.uid_base = uid_base
        self.uid_count = uid_count
        self.extra_env = env or {}
        self.log_path = self.data_dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "CORRAL_CGROUP_ROOT": self.cgroup_name,
            "CORRAL_UID_BASE": str(self.uid_base),
            "CORRAL_UID_COUNT": str(self.uid_count),
            "CORRAL_LOG_LEVEL": "warning",
            "CORRAL_MAX_SANDBOXES": "2000",
            **self.extra_env,
            "PYTHONPATH": str(self.src),
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.launcher, "agent", "--nats-url", self.nats_url,
             "--node-id", NODE_ID, "--data-dir", str(self.data_dir)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Its session (sandboxes it may have left behind): by its process group id.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        remove_cgroups(self.cgroup_name)
        unmount_under(self.data_dir)
        shutil.rmtree(self.data_dir, ignore_errors=True)


class FleetRig:
    """PostgreSQL, nats-server, one agent and replicas (`corral serve --no-local-node`)."""

    def __init__(
        self,
        *,
        src: Path,
        uid_base: int,
        uid_count: int,
        admin_key: str,
        env: dict[str, str] | None = None,
        log: Callable[[str], None] = print,
        launcher: list[str] | None = None,
    ) -> None:
        self.src = src
        self.launcher = launcher  # a wrapper for the replicas' and the agent's CLI
        self.uid_base = uid_base
        self.uid_count = uid_count
        self.admin_key = admin_key
        self.extra_env = env or {}
        self.log = log
        self.postgres: PostgresCluster | None = None
        self.nats: NatsServer | None = None
        self.agent: Agent | None = None
        self.replicas: list[Server] = []
        self.replica_user = NatsUser("replica")
        self.started: dict[str, float] = {}

    def start(self) -> FleetRig:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        t0 = time.monotonic()
        node_user = NatsUser(f"node-{NODE_ID}", permissions=node_permissions(self.src, NODE_ID))
        self.nats = MonitoredNats([self.replica_user, node_user])
        self.nats.start()
        # The agent dials out and retries its registration until a replica takes it: it can
        # start (imports, host checks) while PostgreSQL does.
        self.agent = Agent(
            src=self.src, nats_url=self.nats.url(node_user), uid_base=self.uid_base,
            uid_count=self.uid_count, env=self.extra_env, launcher=self.launcher,
        )  # fmt: skip
        self.agent.start()
        self.postgres = PostgresCluster()
        self.postgres.start()
        self.started["engines_s"] = time.monotonic() - t0
        self.add_replica()
        self.wait_online()
        self.started["fleet_s"] = time.monotonic() - t0

    def add_replica(self) -> Server:
        assert self.postgres is not None and self.nats is not None
        t0 = time.monotonic()
        replica = Server(
            uid_base=self.uid_base, uid_count=self.uid_count, admin_key=self.admin_key,
            tag="bench-replica", src=self.src, launcher=self.launcher,
            env={
                **self.extra_env,
                "CORRAL_DATABASE_URL": self.postgres.url,
                "CORRAL_NATS_URL": self.nats.url(self.replica_user),
                "CORRAL_LOCAL_NODE": "false",
            },
        )  # fmt: skip
        self.replicas.append(replica)  # stopped by close() even if it never came up
        replica.start()
        self.started[f"replica{len(self.replicas)}_s"] = time.monotonic() - t0
        return replica

    def wait_online(self, timeout: float = 90) -> None:
        replica = self.replicas[0]
        deadline = time.monotonic() + timeout
        state = None
        with replica.client() as api:
            while time.monotonic() < deadline:
                assert self.agent is not None
                if self.agent.exited():
                    raise RuntimeError(f"the agent exited: {self.agent.log_tail()}")
                try:
                    items = api.get("/v1/nodes").json().get("items", [])
                    state = next((n["state"] for n in items if n["id"] == NODE_ID), None)
                except httpx.HTTPError:
                    state = None
                if state == "online":
                    return
                time.sleep(0.1)
        raise RuntimeError(f"node {NODE_ID} not online after {timeout:.0f} s (state {state})")

    def cpu_probes(self) -> dict[str, Callable[[], float]]:
        """CPU seconds so far of each part of the fleet, for CpuMeter."""
        assert self.agent is not None and self.nats is not None and self.nats.proc is not None
        agent_pid, nats_pid = self.agent.pid, self.nats.proc.pid
        postmaster = self.postmaster_pid()
        replicas = [r.pid for r in self.replicas]
        probes = {
            "replicas": lambda: sum(proc_cpu_seconds(pid) for pid in replicas),
            "agent": lambda: proc_cpu_seconds(agent_pid),
            "nats": lambda: proc_cpu_seconds(nats_pid),
        }
        if postmaster is not None:
            probes["postgres"] = lambda: tree_cpu_seconds(postmaster)
        return probes

    def postmaster_pid(self) -> int | None:
        if self.postgres is None:
            return None
        try:
            return int((self.postgres.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pg_counters(self) -> dict[str, float]:
        """pg_stat_database of the fleet's database: sessions opened, transactions, rows."""
        assert self.postgres is not None
        pg = self.postgres
        query = f"SELECT {', '.join(PG_COUNTERS)} FROM pg_stat_database WHERE datname = 'corral'"
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "corral", "-d", "corral",
             "-AtF", ",", "-c", query],
            capture_output=True, text=True, timeout=30, check=True,
            env={**os.environ, "PGPASSWORD": pg.password},
        )  # fmt: skip
        values = [float(v) for v in out.stdout.strip().split(",")]
        return {f"pg_{k}": v for k, v in zip(PG_COUNTERS, values, strict=True)}

    def counters(self) -> dict[str, float]:
        """The engines' counters now: per exec, the difference over a phase (see per_exec)."""
        assert self.nats is not None
        return {**self.pg_counters(), **self.nats.counters()}

    def logs(self) -> str:
        parts = []
        if self.agent is not None:
            parts.append("agent:\n" + self.agent.log_tail(2000))
        for i, replica in enumerate(self.replicas, 1):
            parts.append(f"replica {i}:\n" + replica.log_tail(2000))
        return "\n".join(parts)

    def close(self) -> None:
        """Everything, in the reverse order; each part even if another fails."""
        steps: list[tuple[str, Callable[[], None]]] = [
            (f"replica {i}", r.cleanup) for i, r in enumerate(self.replicas, 1)
        ]
        if self.agent is not None:
            steps.append(("agent", self.agent.cleanup))
        if self.nats is not None:
            steps.append(("nats-server", self.nats.remove))
        if self.postgres is not None:
            steps.append(("PostgreSQL", self.postgres.stop))
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # one part that fails to stop must not keep the others
                self.log(f"  fleet: stopping {name} failed: {exc!r}")
        self.replicas.clear()
        self.agent = self.nats = self.postgres = None


def _ts(value: Any) -> float | None:
    if not value:
        return None
    from datetime import datetime

    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


class ExecProbe:
    """Sequential exec `true` over one minimal keep-alive connection, keeping what the server
    says of each (created, started, finished) beside the client's own send and receive times,
    so that a round trip splits into: until the row is created; created to started (the spawn,
    through NATS for a remote node); started to finished (the process, as the node saw it);
    finished to the reply (the result's way back to the client)."""

    def __init__(self, server: Server, sandbox_id: str) -> None:
        self.conn = LeanSyncConnection("127.0.0.1", server.port, server.admin_key)
        self.request = self.conn.request(f"/v1/sandboxes/{sandbox_id}/exec",
                                         {"command": "true", "args": []})  # fmt: skip
        self.replies: list[tuple[float, float, bytes]] = []

    def __call__(self) -> None:
        sent = time.time()
        status, body = self.conn.send(self.request)
        got = time.time()
        if status != 200 or b'"status":"completed"' not in body:
            raise RuntimeError(f"exec: {status} {body[:300]!r}")
        self.replies.append((sent, got, body))

    def split(self, last: int) -> dict[str, float | None]:
        stages: dict[str, list[float]] = {
            "to_created": [], "created_to_started": [], "started_to_finished": [],
            "finished_to_reply": [],
        }  # fmt: skip
        for sent, got, body in self.replies[-last:]:
            data = json.loads(body)
            created = _ts(data.get("created_at"))
            started = _ts(data.get("started_at"))
            finished = _ts(data.get("finished_at"))
            if created is None or started is None or finished is None:
                continue
            stages["to_created"].append((created - sent) * 1000)
            stages["created_to_started"].append((started - created) * 1000)
            stages["started_to_finished"].append((finished - started) * 1000)
            stages["finished_to_reply"].append((got - finished) * 1000)
        return {f"{k}_median_ms": percentile(v, 50) for k, v in stages.items()}

    def close(self) -> None:
        self.conn.close()


def interleaved(calls: dict[str, Callable[[], Any]], n: int, warmup: int = 10) -> dict[str, Sample]:
    """`n` rounds of one timed call of each (ms); the order rotates every round, so that no
    call always follows the same one."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            calls[name]()
            out[name].append((time.perf_counter() - t0) * 1000)
    return {name: Sample(values) for name, values in out.items()}


def per_exec(before: dict[str, float], after: dict[str, float], execs: int) -> dict[str, float]:
    """What each exec cost the engines: PostgreSQL sessions opened and transactions, NATS
    messages. Counters move a little on their own (heartbeats, the counter query's session)."""
    return {
        f"{k}_per_exec": round((after[k] - before[k]) / max(execs, 1), 2)
        for k in before
        if k in after
    }
