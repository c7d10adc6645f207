"""Secrets: named values that sandboxes' injection rules put into their HTTPS requests on the
node (runtime/egress.py). A value is stored and handed to the sandbox's node, never returned by
the API, logged, or shown to a sandbox. With a key (setting `secrets_key`) values are encrypted
at rest (Fernet, its key derived from the setting); without one they are stored as given, in a
database file only its owner reads."""

from __future__ import annotations

import base64
import hashlib
import logging

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import select

from corral.clock import utcnow
from corral.core.errors import BadRequest, NotFound
from corral.core.models import SECRET_REF, InjectRule, Secret, SecretCreate
from corral.runtime.base import Injection
from corral.store.db import Database
from corral.store.tables import SecretRow

log = logging.getLogger(__name__)


class SecretService:
    def __init__(self, db: Database, key: str = "") -> None:
        self.db = db
        self._fernet = (
            Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest())) if key else None
        )

    def _seal(self, value: str) -> str:
        if self._fernet is None:
            return "raw:" + value
        return "enc:" + self._fernet.encrypt(value.encode()).decode()

    def _open(self, stored: str) -> str:
        kind, _, body = stored.partition(":")
        if kind == "raw":
            return body
        if self._fernet is None:
            raise BadRequest("a secret is encrypted and this server has no secrets key")
        try:
            return self._fernet.decrypt(body.encode()).decode()
        except InvalidToken:
            raise BadRequest("a secret was encrypted with another secrets key") from None

    @staticmethod
    def _model(row: SecretRow) -> Secret:
        return Secret(name=row.name, created_at=row.created_at, updated_at=row.updated_at)

    async def put(self, req: SecretCreate) -> tuple[Secret, bool]:
        """Store a secret (replacing one of that name); True when it is new. Sandboxes that
        use it get the new value at their next start or network change."""
        now = utcnow()
        async with self.db.transaction() as session:
            row = await session.get(SecretRow, req.name)
            created = row is None
            if row is None:
                row = SecretRow(name=req.name, created_at=now)
                session.add(row)
            row.value = self._seal(req.value)
            row.updated_at = now
        return self._model(row), created

    async def list(self) -> list[Secret]:
        async with self.db.session() as session:
            rows = (await session.scalars(select(SecretRow).order_by(SecretRow.name))).all()
        return [self._model(r) for r in rows]

    async def delete(self, name: str) -> Secret:
        async with self.db.transaction() as session:
            row = await session.get(SecretRow, name)
            if row is None:
                raise NotFound(f"no secret {name!r}")
            await session.delete(row)
        return self._model(row)

    async def check(self, rules: list[InjectRule]) -> None:
        """Every secret the rules name exists."""
        wanted = {n for r in rules for n in r.secret_names()}
        if not wanted:
            return
        async with self.db.session() as session:
            found = set(
                await session.scalars(select(SecretRow.name).where(SecretRow.name.in_(wanted)))
            )
        missing = sorted(wanted - found)
        if missing:
            raise BadRequest(f"inject: no secret named {', '.join(missing)}")

    async def fill(self, sandbox_id: str, rules: list[InjectRule]) -> tuple[Injection, ...]:
        """The rules with their secrets filled in, for the sandbox's node. A rule whose secret
        is gone (deleted since) is left out, with a warning naming it (not its value)."""
        if not rules:
            return ()
        wanted = {n for r in rules for n in r.secret_names()}
        async with self.db.session() as session:
            rows = (
                await session.scalars(select(SecretRow).where(SecretRow.name.in_(wanted)))
            ).all()
        values = {row.name: self._open(row.value) for row in rows}
        out = []
        for rule in rules:
            missing = [n for n in rule.secret_names() if n not in values]
            if missing:
                log.warning(
                    "sandbox %s: no header %s for %s: secret %s is gone",
                    sandbox_id, rule.header, rule.host, ", ".join(missing),
                )  # fmt: skip
                continue
            value = SECRET_REF.sub(lambda m: values[m.group(1)], rule.value)
            out.append(Injection(rule.host, rule.header, value))
        return tuple(out)
