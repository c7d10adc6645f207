"""Snapshot failures on the fake runtime: whatever goes wrong, nothing is left half-made."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from corral.core.errors import Conflict, NotFound, RateLimited, Unavailable
from corral.core.models import SandboxCreate, SnapshotCreate, SnapshotState
from corral.core.snapshots import STALE_CAPTURE
from corral.runtime.base import Runtime, SandboxConfig
from corral.services import Services
from corral.store.tables import SnapshotRow

from .helpers import run
from .test_core_fake import corral, fake_runtime


async def _rows(services: Services) -> list[SnapshotRow]:
    async with services.db.session() as session:
        return list(await session.scalars(select(SnapshotRow)))


def test_a_failed_capture_leaves_no_row_and_no_files(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            runtime = fake_runtime(services)
            box = await services.sandboxes.create(SandboxCreate())
            removed: list[str] = []

            async def broken(config: SandboxConfig, snapshot_id: str) -> int:
                runtime.snapshots[snapshot_id] = config.id  # half-written files
                raise OSError(28, "No space left on device")

            async def remove(snapshot_id: str) -> None:
                removed.append(snapshot_id)
                runtime.snapshots.pop(snapshot_id, None)

            runtime.snapshot = broken  # type: ignore[method-assign]
            runtime.remove_snapshot = remove  # type: ignore[method-assign]
            with pytest.raises(Unavailable, match="No space left"):
                await services.snapshots.create(box.id, SnapshotCreate(name="full"))
            assert await _rows(services) == [] and runtime.snapshots == {}
            assert len(removed) >= 1
            # The name is free again, and a later capture works.
            del runtime.snapshot, runtime.remove_snapshot
            made = await services.snapshots.create(box.id, SnapshotCreate(name="full"))
            assert made.state == SnapshotState.ready and made.id in runtime.snapshots

    run(main())


def test_a_runtime_without_snapshots_answers_clearly(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            runtime = fake_runtime(services)
            box = await services.sandboxes.create(SandboxCreate())
            runtime.snapshot = Runtime.snapshot.__get__(runtime)  # type: ignore[method-assign]
            with pytest.raises(Unavailable, match="cannot take snapshots"):
                await services.snapshots.create(box.id, SnapshotCreate())
            with pytest.raises(Unavailable, match="cannot take snapshots"):
                await services.snapshots.fork(box.id, SandboxCreate())
            assert await _rows(services) == []
            assert len((await services.sandboxes.list()).items) == 1  # no fork was made

    run(main())


def test_a_fork_whose_sandbox_cannot_be_made_removes_its_snapshot(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path, max_sandboxes=1) as services:
            runtime = fake_runtime(services)
            box = await services.sandboxes.create(SandboxCreate())
            with pytest.raises(RateLimited, match="full"):
                await services.snapshots.fork(box.id, SandboxCreate())
            assert await _rows(services) == [] and runtime.snapshots == {}

    run(main())


def test_the_reaper_removes_abandoned_captures_and_retries_removals(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            runtime = fake_runtime(services)
            box = await services.sandboxes.create(SandboxCreate())
            fresh = await services.snapshots.create(box.id, SnapshotCreate())
            stale = await services.snapshots.create(box.id, SnapshotCreate())
            failing = await services.snapshots.create(box.id, SnapshotCreate())
            async with services.db.transaction() as session:
                # A capture whose replica died long ago, one just begun, a removal that failed.
                await session.execute(
                    update(SnapshotRow)
                    .where(SnapshotRow.id.in_([stale.id, fresh.id]))
                    .values(state=SnapshotState.creating.value)
                )
                await session.execute(
                    update(SnapshotRow)
                    .where(SnapshotRow.id == stale.id)
                    .values(created_at=datetime.now(UTC) - STALE_CAPTURE - timedelta(seconds=1))
                )
                await session.execute(
                    update(SnapshotRow)
                    .where(SnapshotRow.id == failing.id)
                    .values(state=SnapshotState.deleting.value)
                )
            with pytest.raises(Conflict, match="still being taken"):
                await services.snapshots.delete(fresh.id)
            await services.sandboxes.reap_expired()
            assert [r.id for r in await _rows(services)] == [fresh.id]
            assert set(runtime.snapshots) == {fresh.id}
            # A snapshot being removed is started from no more.
            async with services.db.transaction() as session:
                await session.execute(
                    update(SnapshotRow)
                    .where(SnapshotRow.id == fresh.id)
                    .values(state=SnapshotState.deleting.value)
                )
            with pytest.raises(Conflict, match="deleting"):
                await services.sandboxes.create(SandboxCreate(snapshot=fresh.id))
            await services.sandboxes.reap_expired()
            assert await _rows(services) == []
            with pytest.raises(NotFound):
                await services.sandboxes.create(SandboxCreate(snapshot=fresh.id))

    run(main())
