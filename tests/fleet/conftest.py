"""Fleet fixtures: one throwaway PostgreSQL cluster and one NATS server per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.engines import NatsServer, PostgresCluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def nats() -> Iterator[NatsServer]:
    server = NatsServer(listen_address="0.0.0.0").start()  # reachable from tests/fleet/hosts.py
    yield server
    server.remove()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fleet/" in str(item.fspath):
            item.add_marker(pytest.mark.fleet)
