"""A whole fleet for tests: API replicas on one PostgreSQL database and one NATS server, and
agents (`corral agent`), each on a host of its own (a network namespace reaching NATS through
a veth, tests/fleet/hosts.py) with its own data dir, cgroup root and uid block."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from corral.node.bus import node_permissions
from tests.conftest import UID_SLOTS, Server, make_data_dir, next_uid_block
from tests.engines import NatsServer, NatsUser, PostgresCluster
from tests.fleet.hosts import NetnsHost

_fleets = itertools.count(1)


class Agent:
    """`corral agent` in a subprocess, as an operator would run it on a host."""

    def __init__(
        self, node_id: str, nats_url: str, *, lost_after: float, args: tuple[str, ...] = ()
    ) -> None:
        self.node_id = node_id
        self.args = args
        self.nats_url = nats_url
        self.lost_after = lost_after
        self.data_dir = make_data_dir(f"corral-agent-{node_id}-")
        self.cgroup_name = "corral-test-" + self.data_dir.name
        self.uid_base = next_uid_block()
        self.log_path = self.data_dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.prefix: list[str] = []  # e.g. nsenter into a network namespace

    def start(self) -> None:
        env = {
            **os.environ,
            "CORRAL_CGROUP_ROOT": self.cgroup_name,
            "CORRAL_UID_BASE": str(self.uid_base),
            "CORRAL_UID_COUNT": str(UID_SLOTS),
            "CORRAL_LOG_LEVEL": "info",
            "CORRAL_NODE_LOST_AFTER_S": str(self.lost_after),
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "corral", "agent", "--nats-url", self.nats_url,
             "--node-id", self.node_id, "--data-dir", str(self.data_dir), *self.args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill9(self) -> None:
        if self.proc is not None:
            with_children = self.proc.pid
            self.proc.kill()
            self.proc.wait()
            # The agent's own sandboxes die with it as they would with a host's crash.
            subprocess.run(["pkill", "-9", "-s", str(with_children)], capture_output=True)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


class Fleet:
    def __init__(
        self,
        postgres: PostgresCluster,
        *,
        nodes: tuple[str, ...] = ("n1", "n2", "n3"),
        replicas: int = 2,
        lost_after: float = 3.0,
        agent_args: dict[str, tuple[str, ...]] | None = None,
        local_nodes: bool = False,
        env: Callable[[int], dict[str, str]] | None = None,
    ) -> None:
        self.local_nodes = local_nodes  # replicas run a built-in node each (r1, r2, ...)
        self.postgres = postgres
        self.agent_args = agent_args or {}
        self.extra_env = env  # replica index -> more of its environment
        self.node_ids = nodes
        self.lost_after = lost_after
        self.replica_user = NatsUser("replica")
        self.node_users = {n: NatsUser(f"node-{n}", permissions=node_permissions(n)) for n in nodes}
        self.nats = NatsServer(
            [self.replica_user, *self.node_users.values()], listen_address="0.0.0.0"
        )
        self.hosts: dict[str, NetnsHost] = {}
        self.replica_count = replicas
        self.replicas: list[Server] = []
        self.agents: dict[str, Agent] = {}
        self.database_url = ""

    def start(self) -> Fleet:
        try:
            return self._start()
        except BaseException:
            self.stop()  # nothing of a fleet that did not come up outlives the test
            raise

    def _start(self) -> Fleet:
        self.database_url = self.postgres.create_database(f"fleet_{os.getpid()}_{next(_fleets)}")
        self.nats.start()
        for i in range(self.replica_count):
            self.replicas.append(self._replica(self.extra_env(i) if self.extra_env else {}))
        for replica in self.replicas:
            replica.start()
        for node_id in self.node_ids:
            host = self.hosts[node_id] = NetnsHost().start()
            agent = Agent(
                node_id,
                self.nats.url(self.node_users[node_id], address=host.gateway),
                lost_after=self.lost_after,
                args=self.agent_args.get(node_id, ()),
            )
            agent.prefix = ["nsenter", f"--net={host.netns_path}", "--"]
            self.agents[node_id] = agent
            agent.start()
        self.wait_online(*self.node_ids)
        return self

    def _replica(self, extra_env: dict[str, str]) -> Server:
        env = {
            "CORRAL_DATABASE_URL": self.database_url,
            "CORRAL_NATS_URL": self.nats.url(self.replica_user),
            "CORRAL_LOCAL_NODE": "true" if self.local_nodes else "false",
            "CORRAL_NODE_LOST_AFTER_S": str(self.lost_after),
        }
        if self.local_nodes:
            env["CORRAL_NODE_ID"] = f"r{len(self.replicas) + 1}"
        return Server(make_data_dir("corral-replica-"), env={**env, **extra_env})

    def client(self, i: int) -> httpx.Client:
        return self.replicas[i % len(self.replicas)].client()

    def node_states(self) -> dict[str, str]:
        with self.client(0) as api:
            resp = api.get("/v1/nodes")
            resp.raise_for_status()
            return {n["id"]: n["state"] for n in resp.json()["items"]}

    def wait_online(self, *node_ids: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self.node_states()
            if all(states.get(n) == "online" for n in node_ids):
                return
            for n in node_ids:
                agent = self.agents.get(n)
                if agent is not None and agent.proc is not None and agent.proc.poll() is not None:
                    raise RuntimeError(f"agent {n} exited: {agent.log()}")
            time.sleep(0.1)
        raise RuntimeError(f"nodes not online: {states}")

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for replica in self.replicas:
            replica.stop()
        for host in self.hosts.values():
            host.stop()
        self.nats.remove()
        if os.environ.get("CORRAL_TEST_KEEP"):
            return  # for a look at the logs
        for path in [a.data_dir for a in self.agents.values()] + [
            r.data_dir for r in self.replicas
        ]:
            shutil.rmtree(path, ignore_errors=True)


def data_dirs(fleet: Fleet) -> list[Path]:
    return [a.data_dir for a in fleet.agents.values()]
