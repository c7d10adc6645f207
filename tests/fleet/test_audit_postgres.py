"""The audit log on PostgreSQL: the same checks as on SQLite (tests/unit/test_audit_store.py)."""

from __future__ import annotations

import asyncio

from tests.engines import PostgresCluster
from tests.fleet.test_store_postgres import _fresh_database
from tests.unit.test_audit_store import exercise


def test_audit_store_on_postgres(postgres: PostgresCluster) -> None:
    async def main() -> None:
        await exercise(await _fresh_database(postgres))

    asyncio.run(main())
