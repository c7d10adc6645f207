"""Servers for the operations tests: one with real sandboxes at log level info, and a small one
on the fake runtime (what is counted or logged, not what runs, is under test there) with a
tight rate limit, a metrics token and the text log format."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server
from tests.security.helpers import dedicated_server

METRICS_SECRET = "metrics-" + os.urandom(8).hex()


@pytest.fixture(scope="session")
def ops_server() -> Iterator[Server]:
    with dedicated_server("corral-ops-", env={"CORRAL_LOG_LEVEL": "info"}) as server:
        yield server


@pytest.fixture(scope="session")
def limited_server() -> Iterator[Server]:
    env = {
        "CORRAL_RUNTIME": "fake",
        "CORRAL_LOG_LEVEL": "info",
        "CORRAL_LOG_FORMAT": "text",
        "CORRAL_RATE_LIMIT_PER_SECOND": "0.01",
        "CORRAL_RATE_LIMIT_BURST": "3",
        "CORRAL_METRICS_TOKEN": METRICS_SECRET,
    }
    with dedicated_server("corral-ops-limited-", env=env) as server:
        yield server


@pytest.fixture
def ops_api(ops_server: Server) -> Iterator[httpx.Client]:
    with ops_server.client() as client:
        yield client


def new_token(api: httpx.Client, scopes: list[str], name: str = "ops-test") -> dict[str, Any]:
    resp = api.post("/v1/tokens", json={"name": name, "scopes": scopes})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def scrape(
    client: httpx.Client, **kwargs: Any
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by the Prometheus client's own parser, by name and
    labels."""
    resp = client.get("/metrics", **kwargs)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    """The sum of the samples named `name` whose labels include `labels` (0 if none)."""
    return sum(
        v for (n, ls), v in samples.items()
        if n == name and set(labels.items()) <= set(ls)
    )  # fmt: skip


def log_lines(server: Server) -> list[dict[str, Any]]:
    """The JSON lines of the server's log."""
    lines = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines
