"""Webhooks: events (`command.finished`, `sandbox.state`) POSTed, signed, to the URLs that asked.

An event is stored as one delivery per webhook that wants it, in the same transaction as the
change it reports where the change has one (a sandbox's state), else right after (a command's
result, written by the batch writer). The deliverer sends what is due; a 2xx answer ends a
delivery, anything else (another status, an error, no answer within the timeout) schedules the
next attempt with exponential backoff and jitter, until `webhook_retry_for_seconds` (a day)
after the event; then it is `failed`. Every attempt is recorded. Deliveries are stored, so a
restart resumes them: delivery is at least once (a receiver dedupes by `Corral-Event-Id`).

The body is `{"id", "type", "created_at", "data"}`; the headers:
    Corral-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>
    Corral-Event-Id: <the event's id (the same for every webhook and every attempt)>
    Corral-Event-Type, Corral-Delivery-Attempt

One process delivers at a time: in a fleet, the holder of the `webhook-delivery` lease; and
each delivery is claimed by a conditional update before it is sent, so even two holders (one
whose lease lapsed mid-batch) never send one attempt twice at once.

Destinations are http or https URLs; loopback, private, link-local and other non-public
addresses are refused (SSRF) unless `webhook_allow_private` is set, both when the webhook is
made and at every connection (the address connected to is the one checked, so a name that
changes what it resolves to gains nothing). Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from corral import __version__, ids
from corral.clock import utcnow
from corral.core.errors import InvalidArgument, NotFound, PermissionDenied
from corral.core.leases import Lease
from corral.core.models import Page, Scope
from corral.core.paging import decode_cursor, next_cursor
from corral.core.tokens import Principal
from corral.core.webhook_wire import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    Webhook,
    WebhookAttempt,
    WebhookCreate,
    signature_header,
)
from corral.store.db import Database
from corral.store.tables import WebhookAttemptRow, WebhookDeliveryRow, WebhookRow

log = logging.getLogger(__name__)

COMMAND_FINISHED = "command.finished"
SANDBOX_STATE = "sandbox.state"
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
MAX_ANSWER_BYTES = 64 * 1024  # read of a receiver's answer; the rest is dropped
MAX_DELAY_SECONDS = 3600.0  # the longest wait between two attempts
POLL_SECONDS = 0.5  # how often the store is asked for due deliveries (also woken at once)
CACHE_SECONDS = 2.0  # a webhook made on another replica gets this one's events within this
BATCH = 50
CONCURRENCY = 16
MAX_WEBHOOKS_PER_TOKEN = 100
KEEP_SECONDS = 7 * 86_400  # finished deliveries and their attempts are listed this long
PURGE_EVERY_SECONDS = 600.0

# Emits an event: (type, sandbox id, its data (made only if a webhook wants the event), the
# session of the change it reports, if any).
EventData = Callable[[], dict[str, Any]]
EventSink = Callable[[str, str | None, EventData, AsyncSession | None], Awaitable[None]]


# --- the wire --------------------------------------------------------------------------------


# --- destinations ----------------------------------------------------------------------------

SHARED_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not public either


def address_allowed(address: str, allow_private: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    if allow_private:
        return True
    return not (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_reserved
        or (isinstance(ip, ipaddress.IPv4Address) and ip in SHARED_SPACE)
    )


def check_url(url: str) -> tuple[str, int]:
    """The host and port of a webhook URL (http or https, no credentials), else 422."""

    def bad(message: str) -> InvalidArgument:
        details = [{"loc": ["body", "url"], "msg": message}]
        return InvalidArgument(f"url: {message}", details=details)

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise bad("not a URL") from None
    if parts.scheme not in ("http", "https"):
        raise bad("only http and https URLs are delivered to")
    if not parts.hostname:
        raise bad("the URL names no host")
    if parts.username is not None or parts.password is not None:
        raise bad("credentials in the URL are refused; check the signature instead")
    if any(c.isspace() for c in url) or not url.isascii():
        raise bad("the URL must be ASCII without spaces (punycode and percent-encoding)")
    try:
        parts.hostname.encode("idna")  # what resolving it does first (labels of 1 to 63)
    except UnicodeError:
        raise bad("not a valid host name") from None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def resolve_allowed(host: str, port: int, allow_private: bool) -> list[str]:
    """The addresses of `host`, if every one may be delivered to; else ConnectionRefusedError."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectionRefusedError(f"cannot resolve {host}: {exc.strerror}") from None
    except (UnicodeError, ValueError, OSError) as exc:  # e.g. a label over 63 characters
        raise ConnectionRefusedError(f"cannot resolve {host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    refused = [a for a in addresses if not address_allowed(a, allow_private)]
    if refused or not addresses:
        raise ConnectionRefusedError(
            f"{host} is a loopback, private or link-local address: refused "
            "(CORRAL_WEBHOOK_ALLOW_PRIVATE=1 allows it)"
        )
    return addresses


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses a webhook may reach: the check is on the address connected
    to, after resolution (TLS still verifies the URL's host name)."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await resolve_allowed(host, port, self.allow_private)
        except ConnectionRefusedError as exc:
            raise httpcore.ConnectError(str(exc)) from None
        return await self.inner.connect_tcp(
            addresses[0], port, timeout, local_address, socket_options
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks are not delivered to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, allow_private: bool) -> None:
        super().__init__()
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=CONCURRENCY * 2,
            keepalive_expiry=30.0,
            network_backend=GuardedBackend(allow_private),
        )


# --- the service -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hook:
    id: str
    events: frozenset[str]
    sandbox_id: str | None


def to_model(row: WebhookRow, *, secret: bool = False) -> Webhook:
    return Webhook(
        id=row.id,
        url=row.url,
        events=row.events,  # type: ignore[arg-type]
        sandbox=row.sandbox_id,
        created_at=row.created_at,
        secret=row.secret if secret else None,
    )


def attempt_model(row: WebhookAttemptRow) -> WebhookAttempt:
    return WebhookAttempt(
        id=row.id,
        delivery_id=row.delivery_id,
        event_id=row.event_id,
        event_type=row.event_type,  # type: ignore[arg-type]
        attempt=row.attempt,
        at=row.started_at,
        duration_ms=row.duration_ms,
        status_code=row.status_code,
        error=row.error,
        next_retry_at=row.next_retry_at,
    )


class WebhookService:
    def __init__(
        self,
        db: Database,
        holder: str,
        *,
        fleet: bool,
        allow_private: bool,
        retry_base: float,
        retry_for: float,
        timeout: float,
    ) -> None:
        self.db = db
        self.fleet = fleet
        self.allow_private = allow_private
        self.retry_base = retry_base
        self.retry_for = timedelta(seconds=retry_for)
        self.timeout = timeout
        self.lease = Lease(db, "webhook-delivery", holder, ttl=max(5.0, POLL_SECONDS * 10))
        self._hooks: list[_Hook] = []
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._http: httpx.AsyncClient | None = None
        self._purged = 0.0

    # --- webhooks ---

    async def create(self, caller: Principal, req: WebhookCreate) -> Webhook:
        caller.require(Scope.sandboxes)
        if caller.sandbox_ids is not None and (
            req.sandbox is None or not caller.may_use(req.sandbox, live=True)
        ):
            raise PermissionDenied("a token limited to certain sandboxes must name one of them")
        host, port = check_url(req.url)
        try:
            await resolve_allowed(host, port, self.allow_private)
        except ConnectionRefusedError as exc:
            if "cannot resolve" not in str(exc):  # a name may resolve later; an address not
                raise InvalidArgument(
                    f"url: {exc}", details=[{"loc": ["body", "url"], "msg": str(exc)}]
                ) from None
        row = WebhookRow(
            id=ids.new_id(ids.WEBHOOK),
            token_id=caller.token_id,
            url=req.url,
            events=sorted(set(req.events)),
            sandbox_id=req.sandbox,
            secret=req.secret or "whsec_" + secrets.token_urlsafe(32),
            created_at=utcnow(),
        )
        async with self.db.transaction() as session:
            mine = await session.scalars(
                select(WebhookRow.id).where(WebhookRow.token_id == caller.token_id)
            )
            if len(mine.all()) >= MAX_WEBHOOKS_PER_TOKEN:
                raise InvalidArgument(f"a token may have at most {MAX_WEBHOOKS_PER_TOKEN} webhooks")
            session.add(row)
        await self.refresh()
        return to_model(row, secret=True)

    async def list(self, caller: Principal) -> list[Webhook]:
        caller.require(Scope.read)
        query = select(WebhookRow).order_by(WebhookRow.id)
        if not caller.is_admin:
            query = query.where(WebhookRow.token_id == caller.token_id)
        async with self.db.session() as session:
            return [to_model(r) for r in await session.scalars(query)]

    async def _row(self, caller: Principal, webhook_id: str) -> WebhookRow:
        async with self.db.session() as session:
            row = await session.get(WebhookRow, webhook_id)
        if row is None or not (caller.is_admin or row.token_id == caller.token_id):
            raise NotFound(f"no webhook {webhook_id!r}")  # another token's looks missing
        return row

    async def get(self, caller: Principal, webhook_id: str) -> Webhook:
        caller.require(Scope.read)
        return to_model(await self._row(caller, webhook_id))

    async def delete(self, caller: Principal, webhook_id: str) -> Webhook:
        caller.require(Scope.sandboxes)
        row = await self._row(caller, webhook_id)
        async with self.db.transaction() as session:
            for table in (WebhookAttemptRow, WebhookDeliveryRow):
                await session.execute(delete(table).where(table.webhook_id == row.id))
            await session.execute(delete(WebhookRow).where(WebhookRow.id == row.id))
        await self.refresh()
        return to_model(row)

    async def attempts(
        self, caller: Principal, webhook_id: str, *, limit: int, cursor: str | None
    ) -> Page[WebhookAttempt]:
        """Every attempt at the webhook's deliveries, newest first."""
        caller.require(Scope.read)
        row = await self._row(caller, webhook_id)
        query = select(WebhookAttemptRow).where(WebhookAttemptRow.webhook_id == row.id)
        if cursor is not None:
            query = query.where(WebhookAttemptRow.id < decode_cursor(cursor))
        query = query.order_by(WebhookAttemptRow.id.desc()).limit(limit + 1)
        async with self.db.session() as session:
            rows = list(await session.scalars(query))
        items = [attempt_model(r) for r in rows[:limit]]
        return Page(items=items, next_cursor=next_cursor(rows, limit))

    # --- events ---

    def wanted(self, event_type: str) -> bool:
        """Whether any webhook takes `event_type` (from any sandbox): if none does, a change
        need not carry the event in its transaction."""
        return any(event_type in h.events for h in self._hooks)

    async def emit(
        self,
        event_type: str,
        sandbox_id: str | None,
        data: EventData,
        session: AsyncSession | None = None,
    ) -> None:
        """Store the event for every webhook that wants it (in `session`'s transaction, if
        given: with the change it reports)."""
        hooks = [
            h
            for h in self._hooks
            if event_type in h.events and (h.sandbox_id is None or h.sandbox_id == sandbox_id)
        ]
        if not hooks:
            return
        now = utcnow()
        event_id = ids.new_id(ids.EVENT)
        body = json.dumps(
            {
                "id": event_id,
                "type": event_type,
                "created_at": now.isoformat().replace("+00:00", "Z"),
                "data": data(),
            },
            separators=(",", ":"),
        ).encode()
        rows = [
            WebhookDeliveryRow(
                id=ids.new_id(ids.DELIVERY),
                webhook_id=h.id,
                event_id=event_id,
                event_type=event_type,
                body=body,
                state=PENDING,
                attempts=0,
                created_at=now,
                next_attempt_at=now,
            )
            for h in hooks
        ]
        if session is not None:
            session.add_all(rows)
        else:
            async with self.db.transaction() as own:
                own.add_all(rows)
        self._wake.set()

    async def refresh(self) -> None:
        async with self.db.session() as session:
            rows = await session.execute(
                select(WebhookRow.id, WebhookRow.events, WebhookRow.sandbox_id)
            )
            self._hooks = [_Hook(i, frozenset(e), s) for i, e, s in rows]

    # --- delivery ---

    async def start(self) -> None:
        await self.refresh()
        if not self.fleet:
            # One process on this store: the claims there are a dead process's (the last run,
            # killed mid-attempt). Its attempts are sent again now, not once the claims lapse.
            async with self.db.transaction() as session:
                await session.execute(
                    update(WebhookDeliveryRow)
                    .where(WebhookDeliveryRow.claimed_until.is_not(None))
                    .values(claimed_until=None)
                )
        self._http = httpx.AsyncClient(
            transport=GuardedTransport(self.allow_private),
            timeout=httpx.Timeout(self.timeout),
            follow_redirects=False,
            headers={"user-agent": f"corral-webhooks/{__version__}"},
        )
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._keep_fresh()), loop.create_task(self._deliver())]

    async def close(self) -> None:
        # What is being sent stays pending in the store (its claim lapses): resumed later.
        for task in [*self._loops, *self._sending]:
            task.cancel()
        for task in [*self._loops, *self._sending]:
            with contextlib.suppress(BaseException):
                await task
        self._loops = []
        if self.fleet:
            with contextlib.suppress(Exception):
                await self.lease.release()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(CACHE_SECONDS)
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("reading the webhooks failed: %s", exc)

    async def _deliver(self) -> None:
        while True:
            self._wake.clear()
            try:
                if not self.fleet or await self.lease.acquire():
                    await self._send_due()
                    await self._purge()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook delivery failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)

    async def _purge(self) -> None:
        """Forget deliveries that ended (delivered or failed) over KEEP_SECONDS ago."""
        if time.monotonic() - self._purged < PURGE_EVERY_SECONDS:
            return
        self._purged = time.monotonic()
        cutoff = utcnow() - timedelta(seconds=KEEP_SECONDS)
        ended = select(WebhookDeliveryRow.id).where(
            WebhookDeliveryRow.state != PENDING, WebhookDeliveryRow.created_at < cutoff
        )
        async with self.db.transaction() as session:
            await session.execute(
                delete(WebhookAttemptRow).where(WebhookAttemptRow.delivery_id.in_(ended))
            )
            await session.execute(
                delete(WebhookDeliveryRow).where(
                    WebhookDeliveryRow.state != PENDING, WebhookDeliveryRow.created_at < cutoff
                )
            )

    async def _send_due(self) -> None:
        now = utcnow()
        async with self.db.session() as session:
            due = list(
                await session.scalars(
                    select(WebhookDeliveryRow.id)
                    .where(
                        WebhookDeliveryRow.state == PENDING,
                        WebhookDeliveryRow.next_attempt_at <= now,
                        or_(
                            WebhookDeliveryRow.claimed_until.is_(None),
                            WebhookDeliveryRow.claimed_until < now,
                        ),
                    )
                    .order_by(WebhookDeliveryRow.next_attempt_at)
                    .limit(BATCH)
                )
            )
        for delivery_id in due:
            claim = await self._claim(delivery_id)
            if claim is None:
                continue  # another process has it
            await self._slots.acquire()
            task = asyncio.ensure_future(self._attempt(delivery_id, claim))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("a webhook attempt failed", exc_info=task.exception())

    async def _claim(self, delivery_id: str) -> datetime | None:
        now = utcnow()
        until = now + timedelta(seconds=self.timeout + 30)
        async with self.db.transaction() as session:
            result = await session.execute(
                update(WebhookDeliveryRow)
                .where(
                    WebhookDeliveryRow.id == delivery_id,
                    WebhookDeliveryRow.state == PENDING,
                    or_(
                        WebhookDeliveryRow.claimed_until.is_(None),
                        WebhookDeliveryRow.claimed_until < now,
                    ),
                )
                .values(claimed_until=until)
            )
        return until if result.rowcount else None  # type: ignore[attr-defined]

    def delay(self, attempt: int) -> float:
        """Seconds after attempt `attempt` (1, 2, ...) failed: doubling from the base, at most
        MAX_DELAY_SECONDS, the upper half of it at random (so receivers that came back are not
        hit by every sender at once)."""
        full = min(MAX_DELAY_SECONDS, self.retry_base * 2 ** (attempt - 1))
        return full / 2 + random.uniform(0, full / 2)

    async def _attempt(self, delivery_id: str, claim: datetime) -> None:
        async with self.db.session() as session:
            row = await session.get(WebhookDeliveryRow, delivery_id)
            hook = await session.get(WebhookRow, row.webhook_id) if row is not None else None
        if row is None or hook is None:
            return  # deleted with its webhook
        attempt = row.attempts + 1
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: signature_header(hook.secret, timestamp, row.body),
            EVENT_ID_HEADER: row.event_id,
            "Corral-Event-Type": row.event_type,
            "Corral-Delivery-Attempt": str(attempt),
        }
        started, clock = utcnow(), time.monotonic()
        status: int | None = None
        error: str | None = None
        assert self._http is not None
        try:
            async with asyncio.timeout(self.timeout):
                request = self._http.build_request("POST", hook.url, content=row.body,
                                                   headers=headers)  # fmt: skip
                response = await self._http.send(request, stream=True)
                try:
                    status = response.status_code
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= MAX_ANSWER_BYTES:
                            break
                finally:
                    await response.aclose()
        except TimeoutError:
            error = f"no answer within {self.timeout:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__
        duration_ms = int((time.monotonic() - clock) * 1000)
        ok = status is not None and 200 <= status < 300
        if error is None and not ok:
            error = f"answered {status}"
        next_at: datetime | None = None
        state = DELIVERED
        if not ok:
            next_at = utcnow() + timedelta(seconds=self.delay(attempt))
            state = PENDING
            if next_at > row.created_at + self.retry_for:
                state, next_at = FAILED, None
        async with self.db.transaction() as session:
            taken = await session.execute(
                update(WebhookDeliveryRow)
                .where(
                    WebhookDeliveryRow.id == delivery_id,
                    WebhookDeliveryRow.claimed_until == claim,
                )
                .values(attempts=attempt, state=state, next_attempt_at=next_at, claimed_until=None)
            )
            if taken.rowcount:  # type: ignore[attr-defined]
                session.add(
                    WebhookAttemptRow(
                        id=ids.new_id(ids.ATTEMPT),
                        webhook_id=row.webhook_id,
                        delivery_id=row.id,
                        event_id=row.event_id,
                        event_type=row.event_type,
                        attempt=attempt,
                        started_at=started,
                        duration_ms=duration_ms,
                        status_code=status,
                        error=None if ok else error,
                        next_retry_at=next_at,
                    )
                )
        if state == FAILED:
            log.warning("webhook %s: event %s not delivered after %d attempts",
                        hook.id, row.event_id, attempt)  # fmt: skip
        if next_at is not None:
            # Woken for it: the loop polls the store only every POLL_SECONDS anyway.
            asyncio.get_running_loop().call_later(
                max(0.0, (next_at - utcnow()).total_seconds()), self._wake.set
            )
