"""The token watcher over a real SQLite store: one query per check whatever the number of
sessions, revocations seen through the store, expiry by the clock, and the admin key never
ending."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, event

from corral.core.models import Scope, TokenCreate
from corral.core.token_watch import EXPIRED, REVOKED, TokenEnded
from corral.core.tokens import TokenService
from corral.store.db import Database
from corral.store.tables import TokenRow
from tests.unit.helpers import eventually, run

ADMIN = "crl_unit_admin_key"


async def service(tmp_path: Path) -> TokenService:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'corral.db'}")
    await db.migrate()
    tokens = TokenService(db, ADMIN)
    tokens.watcher.check_seconds = 0.2
    return tokens


def count_token_queries(db: Database) -> list[str]:
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "tokens" in statement:
            seen.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", before)
    return seen


def test_one_query_checks_every_session(tmp_path: Path) -> None:
    async def main() -> None:
        tokens = await service(tmp_path)
        made = [await tokens.create(TokenCreate(name=f"t{i}")) for i in range(3)]
        principals = [await tokens.authenticate(t.secret) for t in made]
        leases = [tokens.lease(p) for p in principals for _ in range(100)]  # 300 sessions
        queries = count_token_queries(tokens.db)
        tokens.start_watcher()
        await asyncio.sleep(1.1)  # about five checks
        assert 3 <= len(queries) <= 7, len(queries)
        assert not any(lease.ended for lease in leases)
        # Revoked through the store alone (as by another replica): its 100 sessions end.
        async with tokens.db.transaction() as session:
            await session.execute(delete(TokenRow).where(TokenRow.id == made[0].id))
        await eventually(lambda: all(lease.ended for lease in leases[:100]), timeout=2)
        assert {lease.reason for lease in leases[:100]} == {REVOKED}
        assert not any(lease.ended for lease in leases[100:])
        # Revoked here: at once, without waiting for a check.
        await tokens.delete(made[1].id)
        assert all(lease.reason == REVOKED for lease in leases[100:200])
        for lease in leases[200:]:
            lease.release()
        assert tokens.watcher.watched == 0
        await tokens.stop_watcher()
        await tokens.db.close()

    run(main())


def test_expiry_ends_sessions_on_time(tmp_path: Path) -> None:
    async def main() -> None:
        tokens = await service(tmp_path)
        tokens.watcher.check_seconds = 60  # the store is not asked again: the clock ends it
        made = await tokens.create(TokenCreate(expires_in_seconds=1))
        lease = tokens.lease(await tokens.authenticate(made.secret))
        tokens.start_watcher()
        started = time.monotonic()
        with pytest.raises(TokenEnded) as ended:
            await lease.run(asyncio.sleep(30))
        assert 0.5 < time.monotonic() - started < 1.5
        assert ended.value.message == EXPIRED and ended.value.code == "unauthenticated"
        # A session opened late on a token already gone ends at once.
        late = tokens.watcher.lease(made.id)
        assert late.reason == EXPIRED
        await tokens.stop_watcher()
        await tokens.db.close()

    run(main())


def test_the_admin_key_never_ends(tmp_path: Path) -> None:
    async def main() -> None:
        tokens = await service(tmp_path)
        admin = await tokens.authenticate(ADMIN)
        assert Scope.admin in admin.scopes
        lease = tokens.lease(admin)
        tokens.start_watcher()
        assert await lease.run(asyncio.sleep(0.5, "done")) == "done"
        assert tokens.watcher.watched == 0 and not lease.ended
        await tokens.stop_watcher()
        await tokens.db.close()

    run(main())
