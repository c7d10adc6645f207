"""Named commands (the cmd.io model): users publish programs that run on demand, each run in a
fresh sandbox that is removed afterwards, and share them with tokens through access lists.

A user is a name and the SSH public keys that sign them in. A cmd.io token is an ordinary
Corral token made by a user (`cmd-tokens new`): it has no scopes and no sandboxes, so the only
thing it can do is run the named commands whose access lists hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from corral import ids
from corral.clock import utcnow
from corral.core.commands import CommandService
from corral.core.errors import Conflict, InvalidArgument, NotFound, PermissionDenied
from corral.core.models import (
    NAME_PATTERN,
    ExecRequest,
    Milliseconds,
    SandboxCreate,
    Strict,
    Token,
    TokenCreate,
    TokenCreated,
    check_env,
)
from corral.core.sandboxes import SandboxService
from corral.core.tokens import Principal, TokenService, hash_secret
from corral.core.tokens import to_model as token_model
from corral.node.base import Execution
from corral.store.db import Database
from corral.store.tables import (
    CommandRow,
    NamedCommandAccessRow,
    NamedCommandRow,
    SandboxRow,
    TokenRow,
    UserRow,
)

log = logging.getLogger(__name__)

# No underscore: a user name can never be mistaken for a token (`crl_...`) as an SSH user name.
USER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}$"
NAMED_COMMAND_ID = "nc"
BUILTINS = ("cmd-tokens",)
RUN_SANDBOX_MARGIN_SECONDS = 60  # a run's sandbox outlives its command's timeout by this much


# --- wire models -------------------------------------------------------------------------------


class UserCreate(Strict):
    name: Annotated[str, Field(pattern=USER_PATTERN)]
    ssh_public_keys: list[str] = Field(
        default_factory=list, description="OpenSSH public keys (`ssh-ed25519 AAAA... comment`)"
    )

    @field_validator("ssh_public_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        return [_check_key(k) for k in value]


class User(BaseModel):
    name: str
    ssh_public_keys: list[str]
    created_at: datetime


class NamedCommandCreate(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    command: str = Field(
        min_length=1,
        description="Shell command line; the caller's arguments are appended, each quoted",
    )
    env: dict[str, str] = Field(default_factory=dict)
    template: str = Field(default="host", description="Root filesystem of the sandbox")
    timeout_ms: Milliseconds | None = Field(default=None, description="Default: the server's")
    sandbox: str | None = Field(
        default=None,
        description="Run in this existing sandbox (id or name), kept between runs, instead of "
        "a fresh sandbox removed after each run",
    )
    description: str = Field(default="", max_length=2000)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value)

    @field_validator("command")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL bytes")
        return value

    @field_validator("name")
    @classmethod
    def _not_builtin(cls, value: str) -> str:
        if value in BUILTINS:
            raise ValueError(f"{value!r} is a builtin")
        return value


class NamedCommand(BaseModel):
    id: str
    owner: str
    name: str
    command: str
    env_keys: list[str]
    template: str
    timeout_ms: int | None
    sandbox_id: str | None = None
    description: str
    created_at: datetime
    updated_at: datetime


class AccessGrant(Strict):
    token: str = Field(min_length=1, description="A token's secret or its id")


class AccessEntry(BaseModel):
    token_id: str
    prefix: str
    name: str
    created_at: datetime


def _check_key(key: str) -> str:
    import asyncssh  # only the server needs it

    key = key.strip()
    try:
        asyncssh.import_public_key(key)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ValueError(f"not an OpenSSH public key: {exc}") from None
    return key


def _key_blob(key: str) -> bytes | None:
    import asyncssh

    try:
        return bytes(asyncssh.import_public_key(key).public_data)
    except (asyncssh.KeyImportError, ValueError):
        return None


def command_model(row: NamedCommandRow) -> NamedCommand:
    return NamedCommand(
        id=row.id,
        owner=row.owner,
        name=row.name,
        command=row.command,
        env_keys=sorted(row.env),
        template=row.template,
        timeout_ms=row.timeout_ms,
        sandbox_id=row.sandbox_id,
        description=row.description,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def user_model(row: UserRow) -> User:
    return User(name=row.name, ssh_public_keys=row.ssh_public_keys, created_at=row.created_at)


@dataclass
class NamedRun:
    """A named command running in its own sandbox."""

    command: NamedCommandRow
    sandbox: SandboxRow
    row: CommandRow
    execution: Execution | None  # None: it could not start (see row.status, row.error)


class NamedCommandService:
    def __init__(
        self,
        db: Database,
        sandboxes: SandboxService,
        commands: CommandService,
        tokens: TokenService,
    ) -> None:
        self.db = db
        self.sandboxes = sandboxes
        self.commands = commands
        self.tokens = tokens
        self._cleanups: set[asyncio.Task[None]] = set()

    # --- users ---

    async def create_user(self, req: UserCreate) -> User:
        row = UserRow(name=req.name, ssh_public_keys=req.ssh_public_keys, created_at=utcnow())
        try:
            async with self.db.transaction() as session:
                session.add(row)
        except IntegrityError:
            raise Conflict(f"a user named {req.name!r} exists already") from None
        return user_model(row)

    async def user_row(self, name: str) -> UserRow:
        async with self.db.session() as session:
            row = await session.get(UserRow, name)
        if row is None:
            raise NotFound(f"no user {name!r}")
        return row

    async def get_user(self, name: str) -> User:
        return user_model(await self.user_row(name))

    async def find_user(self, name: str) -> UserRow | None:
        async with self.db.session() as session:
            return await session.get(UserRow, name)

    async def list_users(self) -> list[User]:
        async with self.db.session() as session:
            rows = await session.scalars(select(UserRow).order_by(UserRow.name))
            return [user_model(r) for r in rows]

    async def set_user_keys(self, name: str, keys: list[str]) -> User:
        keys = [_check_key(k) for k in keys]
        async with self.db.transaction() as session:
            row = await session.get(UserRow, name)
            if row is None:
                raise NotFound(f"no user {name!r}")
            row.ssh_public_keys = keys
        return user_model(row)

    async def delete_user(self, name: str) -> None:
        """The user, their named commands, their access lists and their cmd.io tokens."""
        await self.user_row(name)
        async with self.db.transaction() as session:
            command_ids = list(
                await session.scalars(
                    select(NamedCommandRow.id).where(NamedCommandRow.owner == name)
                )
            )
            token_ids = list(
                await session.scalars(select(TokenRow.id).where(TokenRow.owner == name))
            )
            await session.execute(
                delete(NamedCommandAccessRow).where(
                    NamedCommandAccessRow.command_id.in_(command_ids)
                    | NamedCommandAccessRow.token_id.in_(token_ids)
                )
            )
            await session.execute(delete(NamedCommandRow).where(NamedCommandRow.owner == name))
            await session.execute(delete(TokenRow).where(TokenRow.owner == name))
            await session.execute(delete(UserRow).where(UserRow.name == name))
        self.tokens._cache.clear()

    async def key_allowed(self, name: str, key: object) -> bool:
        """Whether `key` (an asyncssh public key) is one of the user's keys."""
        row = await self.find_user(name)
        if row is None:
            return False
        blob = bytes(key.public_data)  # type: ignore[attr-defined]
        return any(_key_blob(k) == blob for k in row.ssh_public_keys)

    # --- named commands ---

    async def create_command(self, owner: str, req: NamedCommandCreate) -> NamedCommand:
        await self.user_row(owner)
        if req.template != "host":
            raise InvalidArgument(f"unknown template {req.template!r}; available: host")
        sandbox_id = (await self.sandboxes.row(req.sandbox)).id if req.sandbox else None
        now = utcnow()
        row = NamedCommandRow(
            id=ids.new_id(NAMED_COMMAND_ID),
            owner=owner,
            name=req.name,
            command=req.command,
            env=req.env,
            template=req.template,
            timeout_ms=req.timeout_ms,
            sandbox_id=sandbox_id,
            description=req.description,
            created_at=now,
            updated_at=now,
        )
        try:
            async with self.db.transaction() as session:
                session.add(row)
        except IntegrityError:
            raise Conflict(f"{owner} has a command named {req.name!r} already") from None
        return command_model(row)

    async def command_row(self, owner: str, name: str) -> NamedCommandRow:
        async with self.db.session() as session:
            row = await session.scalar(
                select(NamedCommandRow).where(
                    NamedCommandRow.owner == owner, NamedCommandRow.name == name
                )
            )
        if row is None:
            raise NotFound(f"no command {owner}/{name}")
        return row

    async def list_commands(self, owner: str) -> list[NamedCommand]:
        await self.user_row(owner)
        async with self.db.session() as session:
            rows = await session.scalars(
                select(NamedCommandRow)
                .where(NamedCommandRow.owner == owner)
                .order_by(NamedCommandRow.name)
            )
            return [command_model(r) for r in rows]

    async def delete_command(self, owner: str, name: str) -> None:
        row = await self.command_row(owner, name)
        async with self.db.transaction() as session:
            await session.execute(
                delete(NamedCommandAccessRow).where(NamedCommandAccessRow.command_id == row.id)
            )
            await session.execute(delete(NamedCommandRow).where(NamedCommandRow.id == row.id))

    async def commands_for_token(self, token_id: str) -> list[NamedCommandRow]:
        async with self.db.session() as session:
            return list(
                await session.scalars(
                    select(NamedCommandRow)
                    .join(
                        NamedCommandAccessRow,
                        NamedCommandAccessRow.command_id == NamedCommandRow.id,
                    )
                    .where(NamedCommandAccessRow.token_id == token_id)
                    .order_by(NamedCommandRow.owner, NamedCommandRow.name)
                )
            )

    # --- access lists ---

    async def _token_row(self, ref: str, owner: str | None = None) -> TokenRow:
        """A token by its secret or its id (limited to `owner`'s cmd.io tokens when given)."""
        async with self.db.session() as session:
            row = await session.get(TokenRow, ref)
            if row is None:
                row = await session.scalar(
                    select(TokenRow).where(TokenRow.secret_hash == hash_secret(ref))
                )
        if row is None or (owner is not None and row.owner != owner):
            raise NotFound("no such token")
        return row

    async def grant(self, owner: str, name: str, token_ref: str) -> AccessEntry:
        command = await self.command_row(owner, name)
        token = await self._token_row(token_ref)
        now = utcnow()
        async with self.db.transaction() as session:
            found = await session.get(NamedCommandAccessRow, (command.id, token.id))
            if found is None:
                session.add(
                    NamedCommandAccessRow(command_id=command.id, token_id=token.id, created_at=now)
                )
            else:
                now = found.created_at
        return AccessEntry(token_id=token.id, prefix=token.prefix, name=token.name, created_at=now)

    async def revoke(self, owner: str, name: str, token_ref: str) -> None:
        command = await self.command_row(owner, name)
        try:
            token_id = (await self._token_row(token_ref)).id
        except NotFound:
            token_id = token_ref
        async with self.db.transaction() as session:
            result = await session.execute(
                delete(NamedCommandAccessRow).where(
                    NamedCommandAccessRow.command_id == command.id,
                    NamedCommandAccessRow.token_id == token_id,
                )
            )
        if result.rowcount == 0:  # type: ignore[attr-defined]
            raise NotFound(f"that token has no access to {owner}/{name}")

    async def access_list(self, owner: str, name: str) -> list[AccessEntry]:
        command = await self.command_row(owner, name)
        async with self.db.session() as session:
            pairs = (
                await session.execute(
                    select(NamedCommandAccessRow, TokenRow)
                    .join(TokenRow, TokenRow.id == NamedCommandAccessRow.token_id)
                    .where(NamedCommandAccessRow.command_id == command.id)
                    .order_by(NamedCommandAccessRow.created_at)
                )
            ).all()
        return [
            AccessEntry(token_id=t.id, prefix=t.prefix, name=t.name, created_at=a.created_at)
            for a, t in pairs
        ]

    async def may_run(self, principal: Principal, command: NamedCommandRow) -> bool:
        if principal.is_admin:
            return True
        async with self.db.session() as session:
            found = await session.get(NamedCommandAccessRow, (command.id, principal.token_id))
        return found is not None

    async def authorize(self, principal: Principal, owner: str, name: str) -> NamedCommandRow:
        """The command, if `principal` may run it: NotFound, else Unauthenticated-like denial."""
        command = await self.command_row(owner, name)
        if not await self.may_run(principal, command):
            raise PermissionDenied(f"this token has no access to {owner}/{name}")
        return command

    # --- cmd.io tokens ---

    async def new_token(self, owner: str) -> TokenCreated:
        await self.user_row(owner)
        created = await self.tokens.create(
            TokenCreate(name=f"cmd-tokens:{owner}", scopes=[], sandbox_ids=[])
        )
        async with self.db.transaction() as session:
            await session.execute(
                update(TokenRow).where(TokenRow.id == created.id).values(owner=owner)
            )
        return created

    async def list_tokens(self, owner: str) -> list[Token]:
        async with self.db.session() as session:
            rows = await session.scalars(
                select(TokenRow).where(TokenRow.owner == owner).order_by(TokenRow.id)
            )
            return [token_model(r) for r in rows]

    async def remove_token(self, owner: str, ref: str) -> str:
        row = await self._token_row(ref, owner)
        async with self.db.transaction() as session:
            await session.execute(
                delete(NamedCommandAccessRow).where(NamedCommandAccessRow.token_id == row.id)
            )
        await self.tokens.delete(row.id)
        return row.id

    # --- running ---

    @contextlib.asynccontextmanager
    async def run(
        self,
        command: NamedCommandRow,
        args: list[str],
        *,
        source: str,
        stdin: bytes | None = None,
        interactive: bool = False,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
    ) -> AsyncIterator[NamedRun]:
        """Start `command` with `args` in a fresh sandbox; the sandbox is removed on exit.

        The arguments are appended to the command line, each shell-quoted, as they would be to
        a container's entrypoint. With `stdin` the bytes are written and standard input closed;
        with `interactive` the caller feeds it. A command bound to a sandbox runs there instead,
        and that sandbox stays.
        """
        if any("\x00" in a for a in args):
            raise InvalidArgument("arguments must not contain NUL bytes")
        line = " ".join([command.command, *(shlex.quote(a) for a in args)])
        fresh: str | None = None
        started: CommandRow | None = None
        try:
            if command.sandbox_id is not None:
                sandbox = await self.sandboxes.running_row(command.sandbox_id)
            else:
                # A lifetime, so that even a crash of the server cannot leave it behind.
                timeout_ms = command.timeout_ms or self.commands.settings.default_timeout_ms
                created = await self.sandboxes.create(
                    SandboxCreate(
                        template=command.template,
                        labels={"cmdio.owner": command.owner, "cmdio.command": command.name},
                        ttl_seconds=timeout_ms // 1000 + RUN_SANDBOX_MARGIN_SECONDS,
                    )
                )
                fresh = created.id
                sandbox = await self.sandboxes.running_row(created.id)
            row, execution = await self.commands.start(
                sandbox,
                ExecRequest(command=line, env=command.env, timeout_ms=command.timeout_ms),
                source=source,
                stdin=stdin,
                interactive=interactive,
                tty=tty,
                rows=rows,
                cols=cols,
            )
            started = row
            yield NamedRun(command, sandbox, row, execution)
        finally:
            if fresh is not None:
                # A caller that went away (a closed stream) does not end the run: the command
                # goes on to its end or its timeout. Then the sandbox is removed, which ends
                # whatever the command left running; its history stays.
                done = started is None or await self.commands.execution(started) is None
                task = asyncio.ensure_future(
                    self._remove(fresh, None if done or started is None else started.id)
                )
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)
                if done:
                    await asyncio.shield(task)

    async def _remove(self, sandbox_id: str, running: str | None = None) -> None:
        if running is not None:
            await self.commands.wait_finished(running)
        try:
            await self.sandboxes.delete(sandbox_id)
        except Exception:
            log.exception("could not remove the sandbox %s of a named command", sandbox_id)
