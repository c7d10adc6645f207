"""`corral agent` as a process: it stops when told to, whether or not a replica ever answered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.engines import NatsServer


def test_an_agent_that_no_replica_answered_stops_on_sigterm(tmp_path: Path) -> None:
    nats = NatsServer().start()
    try:
        env = {**os.environ, "CORRAL_RUNTIME": "fake", "CORRAL_LOG_LEVEL": "warning"}
        log = (tmp_path / "agent.log").open("wb")
        agent = subprocess.Popen(
            [sys.executable, "-m", "corral", "agent", "--nats-url", nats.url(nats.users[0]),
             "--node-id", "alone", "--data-dir", str(tmp_path / "data")],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        # Connected, and registering with nobody to answer; then NATS goes as well.
        log_path = tmp_path / "agent.log"
        deadline = time.monotonic() + 20
        while "registering node alone" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline and agent.poll() is None, log_path.read_text()
            time.sleep(0.1)
        nats.kill()
        agent.send_signal(signal.SIGTERM)
        try:
            assert agent.wait(15) == 0
        finally:
            if agent.poll() is None:
                agent.kill()
    finally:
        nats.remove()
