"""Idempotency keys in the store: a create or command start made with a key is done once per
token and key; every retry within the key's lifetime gets the first answer.

The order is what makes it hold across a crash:
1. The key is claimed (a row: token, key, the request's fingerprint, the claiming process)
   before any work is done. A second claim of the same key finds the row.
2. The service that makes the resource ties its id to the key in the same transaction that
   stores it (`bind`), so a resource that exists is always found from its key.
3. The answer is stored once given. A retry that finds a claim whose process is gone (killed
   after step 2, before step 3) is answered from the resource itself; one that finds no
   resource either takes the claim over and does the work.

Answers are kept sealed (AES-GCM) under a key derived from the caller's token secret, which the
store never holds: a stored answer (a new token's secret, a command's output) is readable only
by a retry that carries that token.

A claim's process is alive while it is this process, or, in a fleet, while its replica lease
(core/replicas.py) is unexpired; one server on a data dir is the only process there (host lock).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from corral.clock import utcnow
from corral.core.errors import Conflict
from corral.core.replicas import PREFIX as REPLICA_PREFIX
from corral.store.db import Database
from corral.store.tables import IdempotencyKeyRow, LeaseRow

TTL = timedelta(hours=24)
MAX_KEY_LENGTH = 255
PURGE_EVERY_SECONDS = 600.0
PENDING, DONE = "pending", "done"


def valid_key(key: str) -> bool:
    """At most 255 printable ASCII characters (space included, not at either end)."""
    return (
        0 < len(key) <= MAX_KEY_LENGTH
        and key == key.strip()
        and key.isascii()
        and key.isprintable()
    )


def fingerprint(method: str, path: str, query: str, body: bytes) -> str:
    """What makes two requests the same: method, path, query and body (a JSON body compared by
    its content, not its spelling)."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, UnicodeDecodeError):
        canonical = body
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query.encode(), canonical):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def answer_key(secret: str) -> bytes:
    """The key a token's answers are sealed with: not derivable from what the store keeps of
    the token (a SHA-256 of its secret)."""
    return hmac.new(secret.encode(), b"corral idempotent answer", hashlib.sha256).digest()


def seal(key: bytes, plain: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plain, None)


def unseal(key: bytes, sealed: bytes) -> bytes | None:
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], None)
    except (InvalidTag, ValueError):
        return None


@dataclass
class Claim:
    """This process's hold on a key while it does the work."""

    token_id: str
    key: str
    resource: tuple[str, str] | None = None  # (kind, id), once bound


_current: contextvars.ContextVar[Claim | None] = contextvars.ContextVar(
    "corral_idempotency_claim", default=None
)


def current() -> Claim | None:
    return _current.get()


def enter(claim: Claim | None) -> contextvars.Token[Claim | None]:
    return _current.set(claim)


def leave(token: contextvars.Token[Claim | None]) -> None:
    _current.reset(token)


async def bind(session: AsyncSession, kind: str, resource_id: str) -> None:
    """Tie the resource being stored in `session`'s transaction to the request's key, if the
    request has one (in the same transaction: both are stored, or neither)."""
    claim = _current.get()
    if claim is None or claim.resource is not None:
        return  # no key; or the request makes more than one thing, and the first one counts
    await session.execute(
        update(IdempotencyKeyRow)
        .where(IdempotencyKeyRow.token_id == claim.token_id, IdempotencyKeyRow.key == claim.key)
        .values(resource_kind=kind, resource_id=resource_id)
    )
    claim.resource = (kind, resource_id)


@dataclass
class Found:
    """What a claim found instead of a free key."""

    kind: Literal["replay", "mismatch", "in_flight", "orphan"]
    row: IdempotencyKeyRow


class IdempotencyKeys:
    def __init__(self, db: Database, holder: str, *, fleet: bool) -> None:
        self.db = db
        self.holder = holder
        self.fleet = fleet
        self._purged = 0.0

    async def claim(
        self, token_id: str, key: str, print_: str, method: str, path: str
    ) -> Claim | Found:
        """The key for this process (a Claim), or what holds it already."""
        await self._purge()
        for _ in range(3):
            now = utcnow()
            row = IdempotencyKeyRow(
                token_id=token_id,
                key=key,
                fingerprint=print_,
                method=method,
                path=path[:2000],
                state=PENDING,
                owner=self.holder,
                created_at=now,
                expires_at=now + TTL,
            )
            try:
                async with self.db.transaction() as session:
                    session.add(row)
                return Claim(token_id, key)
            except IntegrityError:
                pass
            async with self.db.transaction() as session:
                found = await session.get(IdempotencyKeyRow, (token_id, key))
                if found is None:
                    continue  # released meanwhile: claim it again
                if found.expires_at <= now:
                    await session.delete(found)
                    continue
            if found.fingerprint != print_:
                return Found("mismatch", found)
            if found.state == DONE:
                return Found("replay", found)
            if await self.alive(found.owner):
                return Found("in_flight", found)
            if found.resource_id is not None:
                return Found("orphan", found)  # made, never answered: answer from the resource
            if await self._take_over(found):
                return Claim(token_id, key)
        raise Conflict("the idempotency key is changing hands; retry", details={"retry": True})

    async def wait(self, token_id: str, key: str, seconds: float) -> IdempotencyKeyRow | None:
        """The row once it is no longer in flight (done, orphaned or released: None), or the
        in-flight row after `seconds`."""
        deadline = time.monotonic() + seconds
        delay = 0.05
        while True:
            async with self.db.session() as session:
                row = await session.get(IdempotencyKeyRow, (token_id, key))
            if row is None or row.state == DONE or not await self.alive(row.owner):
                return row
            if time.monotonic() >= deadline:
                return row
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def finish(
        self, claim: Claim, status: int, headers: list[list[str]], body: bytes | None
    ) -> None:
        """Keep the answer for the key's retries."""
        async with self.db.transaction() as session:
            await session.execute(
                update(IdempotencyKeyRow)
                .where(
                    IdempotencyKeyRow.token_id == claim.token_id,
                    IdempotencyKeyRow.key == claim.key,
                    IdempotencyKeyRow.owner == self.holder,
                )
                .values(state=DONE, status_code=status, headers=headers, body=body)
            )

    async def finish_orphan(
        self, claim: Claim, owner: str, status: int, headers: list[list[str]], body: bytes
    ) -> None:
        """Keep the answer made from the resource of a claim whose process is gone."""
        async with self.db.transaction() as session:
            await session.execute(
                update(IdempotencyKeyRow)
                .where(
                    IdempotencyKeyRow.token_id == claim.token_id,
                    IdempotencyKeyRow.key == claim.key,
                    IdempotencyKeyRow.owner == owner,
                )
                .values(state=DONE, status_code=status, headers=headers, body=body)
            )

    async def release(self, claim: Claim) -> None:
        """Free the key: nothing was made (a refusal, or a failure before the work)."""
        async with self.db.transaction() as session:
            await session.execute(
                delete(IdempotencyKeyRow).where(
                    IdempotencyKeyRow.token_id == claim.token_id,
                    IdempotencyKeyRow.key == claim.key,
                    IdempotencyKeyRow.owner == self.holder,
                    IdempotencyKeyRow.state == PENDING,
                    IdempotencyKeyRow.resource_id.is_(None),
                )
            )

    async def _take_over(self, row: IdempotencyKeyRow) -> bool:
        async with self.db.transaction() as session:
            result = await session.execute(
                update(IdempotencyKeyRow)
                .where(
                    IdempotencyKeyRow.token_id == row.token_id,
                    IdempotencyKeyRow.key == row.key,
                    IdempotencyKeyRow.owner == row.owner,
                    IdempotencyKeyRow.state == PENDING,
                    IdempotencyKeyRow.resource_id.is_(None),
                )
                .values(owner=self.holder)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def alive(self, owner: str) -> bool:
        if owner == self.holder:
            return True
        if not self.fleet:
            return False  # the only process on this store is this one
        name = REPLICA_PREFIX + hashlib.sha256(owner.encode()).hexdigest()[:32]
        async with self.db.session() as session:
            lease = await session.scalar(select(LeaseRow).where(LeaseRow.name == name))
        return lease is not None and lease.holder == owner and lease.expires_at > utcnow()

    async def _purge(self) -> None:
        if time.monotonic() - self._purged < PURGE_EVERY_SECONDS:
            return
        self._purged = time.monotonic()
        async with self.db.transaction() as session:
            await session.execute(
                delete(IdempotencyKeyRow).where(IdempotencyKeyRow.expires_at <= utcnow())
            )
