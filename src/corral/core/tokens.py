"""Tokens and the caller they identify.

A token is a random secret shown once; only its SHA-256 is stored (the secret has 256 bits of
entropy, so a slow hash adds nothing). The admin key is a token with every scope.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update

from corral import ids
from corral.core.errors import NotFound, PermissionDenied, RateLimited, Unauthenticated
from corral.core.metrics import Metrics
from corral.core.models import Scope, Token, TokenCreate, TokenCreated
from corral.core.token_watch import REVOKED, UNKNOWN, TokenLease, TokenWatcher
from corral.store.db import Database
from corral.store.tables import TokenRow

SECRET_PREFIX = "crl_"
ADMIN_TOKEN_ID = "admin"  # the admin key's Principal.token_id: it is not in the store
CACHE_SECONDS = 5.0  # a revoked token stops working on other replicas within this time
LAST_USED_EVERY = 60.0  # last_used_at is written at most this often per token


@dataclass
class CallerNote:
    """Who a request turned out to be, noted by `authenticate` for the request's log line and
    audit entry (api/observe.py sets one per request in `CALLER`)."""

    token_id: str | None = None
    token_name: str | None = None


CALLER: ContextVar[CallerNote | None] = ContextVar("corral_caller", default=None)


@dataclass(frozen=True)
class Principal:
    token_id: str  # "admin" for the admin key
    scopes: frozenset[Scope]
    sandbox_ids: frozenset[str] | None = None  # None: every sandbox

    @property
    def is_admin(self) -> bool:
        return Scope.admin in self.scopes

    def require(self, scope: Scope) -> None:
        if not self.is_admin and scope not in self.scopes:
            raise PermissionDenied(f"this token lacks the '{scope.value}' scope")

    def may_use(self, sandbox_id: str, name: str | None = None, *, live: bool) -> bool:
        """Whether the token's limit covers the sandbox `sandbox_id` (named `name`).

        A name in the limit covers a sandbox only while it is live: once it is deleted the
        name may go to a new sandbox, and the old one's history must not go with it. A
        deleted sandbox is covered by its id alone.
        """
        if self.sandbox_ids is None:
            return True
        if sandbox_id in self.sandbox_ids:
            return True
        return live and name is not None and name in self.sandbox_ids


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def to_model(row: TokenRow) -> Token:
    return Token(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        scopes=[Scope(s) for s in row.scopes],
        sandbox_ids=row.sandbox_ids,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
    )


@dataclass(frozen=True)
class RateInfo:
    """A token's request budget, as `X-RateLimit-*` headers show it."""

    limit: int  # the burst: requests that may be made at once
    remaining: int  # requests that may be made now
    reset: int  # epoch seconds at which the budget is full again


class TokenRateLimited(RateLimited):
    """A token's budget is spent; `info` tells the budget."""

    def __init__(self, message: str, *, retry_after: float, info: RateInfo) -> None:
        super().__init__(message, retry_after=retry_after)
        self.info = info


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.limit_rate = self.rate = rate
        self.limit_burst = self.burst = burst
        self._state: dict[str, tuple[float, float]] = {}

    def share(self, replicas: int) -> None:
        """Allow this process its share of the limit, `replicas` serving the same tokens."""
        self.rate = self.limit_rate / max(1, replicas)
        self.burst = max(1, self.limit_burst // max(1, replicas))

    def take(self, key: str) -> None:
        now = time.monotonic()
        tokens, last = self._state.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._state[key] = (tokens, now)
            raise TokenRateLimited(
                "too many requests for this token",
                retry_after=(1.0 - tokens) / self.rate,
                info=self.info(key),
            )
        self._state[key] = (tokens - 1.0, now)

    def info(self, key: str) -> RateInfo:
        now = time.monotonic()
        tokens, last = self._state.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        full_in = (self.burst - tokens) / self.rate
        return RateInfo(self.burst, int(tokens), int(time.time() + full_in + 0.999))


class TokenService:
    def __init__(
        self,
        db: Database,
        admin_key: str,
        rate: float = 0.0,
        burst: int = 200,
        metrics: Metrics | None = None,
    ) -> None:
        self.db = db
        self.metrics = metrics or Metrics()
        self._admin_hash = hash_secret(admin_key)
        self._cache: dict[str, tuple[float, TokenRow | None]] = {}
        self._last_used: dict[str, float] = {}
        self._bucket = TokenBucket(rate, burst) if rate > 0 else None
        self._expiry: dict[str, datetime | None] = {}  # by token id, as last read from the store
        self.watcher = TokenWatcher(db, on_gone=self._forget)

    async def authenticate(self, secret: str | None) -> Principal:
        if not secret:
            raise Unauthenticated("a token is required")
        digest = hash_secret(secret)
        if hmac.compare_digest(digest, self._admin_hash):
            principal = Principal(ADMIN_TOKEN_ID, frozenset(Scope))
            name: str | None = ADMIN_TOKEN_ID
        else:
            row = await self._lookup(digest)
            now = datetime.now(UTC)
            if row is None or (row.expires_at is not None and row.expires_at <= now):
                raise Unauthenticated("invalid or expired token")
            await self._touch(row.id, now)
            if len(self._expiry) > 10_000:
                self._expiry.clear()
            self._expiry[row.id] = row.expires_at
            principal = Principal(
                row.id,
                frozenset(Scope(s) for s in row.scopes),
                frozenset(row.sandbox_ids) if row.sandbox_ids is not None else None,
            )
            name = row.name
        note = CALLER.get()
        if note is not None:
            note.token_id, note.token_name = principal.token_id, name
        if self._bucket is not None:
            try:
                self._bucket.take(principal.token_id)
            except TokenRateLimited:
                self.metrics.refused("token")
                raise
        return principal

    async def identify(self, secret: str | None) -> str | None:
        """The id of the live token `secret` is, or None; no rate limit is taken and nothing
        is written (what a key is scoped by, ahead of the route's own authentication)."""
        if not secret:
            return None
        digest = hash_secret(secret)
        if hmac.compare_digest(digest, self._admin_hash):
            return ADMIN_TOKEN_ID
        row = await self._lookup(digest)
        if row is None or (row.expires_at is not None and row.expires_at <= datetime.now(UTC)):
            return None
        return row.id

    def derive(self, label: str) -> str:
        """A secret for `label` that every replica computes alike and no one can guess without
        the admin key (e.g. a sandbox's own access token)."""
        return hmac.new(self._admin_hash.encode(), label.encode(), hashlib.sha256).hexdigest()

    def lease(self, principal: Principal) -> TokenLease:
        """A hold on the caller's token for a long-lived session: it ends when the token is
        revoked or expires (the admin key never does). Release it when the session ends."""
        if principal.token_id == ADMIN_TOKEN_ID:
            return TokenLease(ADMIN_TOKEN_ID, None)
        return self.watcher.lease(principal.token_id, self._expiry.get(principal.token_id, UNKNOWN))

    def start_watcher(self) -> None:
        self.watcher.start()

    async def stop_watcher(self) -> None:
        await self.watcher.stop()

    def _forget(self, token_id: str) -> None:
        """Drop what is cached of a token found revoked elsewhere, so that it is refused here at
        once rather than when the cache would have expired."""
        for digest, (_, row) in list(self._cache.items()):
            if row is not None and row.id == token_id:
                del self._cache[digest]
        self._expiry.pop(token_id, None)

    def share_limits(self, replicas: int) -> None:
        """A fleet's replicas split each token's rate limit between them."""
        if self._bucket is not None:
            self._bucket.share(replicas)

    def rate_info(self, token_id: str) -> RateInfo | None:
        """The budget left to a token; None when no rate limit is configured."""
        return self._bucket.info(token_id) if self._bucket is not None else None

    async def _lookup(self, digest: str) -> TokenRow | None:
        hit = self._cache.get(digest)
        now = time.monotonic()
        if hit is not None and now - hit[0] < CACHE_SECONDS:
            return hit[1]
        async with self.db.session() as session:
            row = await session.scalar(select(TokenRow).where(TokenRow.secret_hash == digest))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now, row)
        return row

    async def _touch(self, token_id: str, now: datetime) -> None:
        mono = time.monotonic()
        if mono - self._last_used.get(token_id, 0.0) < LAST_USED_EVERY:
            return
        self._last_used[token_id] = mono
        async with self.db.transaction() as session:
            await session.execute(
                update(TokenRow).where(TokenRow.id == token_id).values(last_used_at=now)
            )

    async def create(self, req: TokenCreate) -> TokenCreated:
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        row = TokenRow(
            id=ids.new_id(ids.TOKEN),
            name=req.name,
            prefix=secret[: len(SECRET_PREFIX) + 6],
            secret_hash=hash_secret(secret),
            scopes=sorted({s.value for s in req.scopes}),
            sandbox_ids=sorted(set(req.sandbox_ids)) if req.sandbox_ids is not None else None,
            created_at=now,
            expires_at=now + timedelta(seconds=req.expires_in_seconds)
            if req.expires_in_seconds
            else None,
        )
        async with self.db.transaction() as session:
            session.add(row)
        return TokenCreated(**to_model(row).model_dump(), secret=secret)

    async def list(self) -> list[Token]:
        async with self.db.session() as session:
            rows = await session.scalars(select(TokenRow).order_by(TokenRow.id))
            return [to_model(r) for r in rows]

    async def delete(self, token_id: str) -> None:
        async with self.db.transaction() as session:
            result = await session.execute(delete(TokenRow).where(TokenRow.id == token_id))
        if result.rowcount == 0:  # type: ignore[attr-defined]
            raise NotFound(f"no token {token_id}")
        self._cache.clear()
        self._expiry.pop(token_id, None)
        # Its sessions here end now; other replicas see the row gone at their next check.
        self.watcher.end(token_id, REVOKED)
