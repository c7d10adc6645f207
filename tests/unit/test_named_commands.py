"""Named commands (cmd.io) and the faces' helpers, on the fake runtime over real SQLite."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from corral.api.faces._common import Problem, face_router, shell_exit_code
from corral.core.errors import Conflict, NotFound, PermissionDenied, RateLimited
from corral.core.models import Command, CommandStatus, SandboxState, TokenCreate
from corral.core.named_commands import NamedCommandCreate, UserCreate
from corral.core.tokens import TokenBucket, TokenRateLimited
from corral.services import Services
from corral.settings import Settings

from .helpers import run

ADMIN_KEY = "crl_unit_admin_key_named_0123456789"
KEY = asyncssh.generate_private_key("ssh-ed25519")
PUBLIC = KEY.export_public_key().decode().strip()


@asynccontextmanager
async def corral(tmp_path: Path, **overrides: Any) -> AsyncIterator[Services]:
    overrides.setdefault("warm_pool", 0)
    settings = Settings(runtime="fake", data_dir=tmp_path, admin_key=ADMIN_KEY, **overrides)
    services = await Services.start(settings)
    try:
        yield services
    finally:
        await services.close()


def test_users_commands_access_and_tokens(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            named = services.named
            await named.create_user(UserCreate(name="alice", ssh_public_keys=[PUBLIC]))
            with pytest.raises(Conflict):
                await named.create_user(UserCreate(name="alice"))
            assert await named.key_allowed("alice", KEY)
            assert not await named.key_allowed(
                "alice", asyncssh.generate_private_key("ssh-ed25519")
            )
            assert not await named.key_allowed("bob", KEY)

            made = await named.create_command(
                "alice", NamedCommandCreate(name="hi", command="echo")
            )
            assert made.owner == "alice" and made.sandbox_id is None
            with pytest.raises(Conflict):
                await named.create_command("alice", NamedCommandCreate(name="hi", command="x"))
            with pytest.raises(NotFound):
                await named.create_command("bob", NamedCommandCreate(name="hi", command="x"))

            token = await named.new_token("alice")
            assert token.scopes == [] and token.sandbox_ids == []
            principal = await services.tokens.authenticate(token.secret)
            row = await named.command_row("alice", "hi")
            assert not await named.may_run(principal, row)
            with pytest.raises(PermissionDenied):
                await named.authorize(principal, "alice", "hi")
            await named.grant("alice", "hi", token.secret)  # by secret
            await named.grant("alice", "hi", token.id)  # again, by id: no duplicate
            assert [e.token_id for e in await named.access_list("alice", "hi")] == [token.id]
            assert await named.may_run(principal, row)
            assert [r.name for r in await named.commands_for_token(token.id)] == ["hi"]
            admin = await services.tokens.authenticate(ADMIN_KEY)
            assert await named.may_run(admin, row)

            assert [t.id for t in await named.list_tokens("alice")] == [token.id]
            await named.revoke("alice", "hi", token.id)
            assert not await named.may_run(principal, row)
            with pytest.raises(NotFound):
                await named.revoke("alice", "hi", token.id)

            # A user's deletion takes their commands, access lists and tokens with them.
            await named.grant("alice", "hi", token.id)
            await named.delete_user("alice")
            with pytest.raises(NotFound):
                await named.command_row("alice", "hi")
            assert await named.commands_for_token(token.id) == []
            with pytest.raises(Exception, match="invalid"):
                await services.tokens.authenticate(token.secret)

    run(main())


def test_a_run_gets_a_fresh_sandbox_that_is_removed(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            named = services.named
            await named.create_user(UserCreate(name="alice"))
            row = await named.create_command(
                "alice", NamedCommandCreate(name="hi", command="echo hi", env={"A": "1"})
            )
            command = await named.command_row("alice", row.name)
            async with named.run(command, ["there"], source="test") as ran:
                assert ran.execution is not None
                sandbox_id = ran.sandbox.id
                await services.commands.wait_finished(ran.row.id)
                result = await services.commands.get(sandbox_id, ran.row.id)
            assert result.command == "echo hi there" and result.env_keys == ["A"]
            assert result.stdout == "hi there\n"
            gone = await services.sandboxes.get(sandbox_id)
            assert gone.state is SandboxState.deleted
            assert gone.labels == {"cmdio.owner": "alice", "cmdio.command": "hi"}

    run(main())


def test_a_bound_command_runs_in_its_sandbox_and_keeps_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with corral(tmp_path) as services:
            from corral.core.models import SandboxCreate

            box = await services.sandboxes.create(SandboxCreate(name="box"))
            named = services.named
            await named.create_user(UserCreate(name="alice"))
            made = await named.create_command(
                "alice", NamedCommandCreate(name="hi", command="echo hi", sandbox="box")
            )
            assert made.sandbox_id == box.id
            async with named.run(await named.command_row("alice", "hi"), [], source="t") as ran:
                assert ran.sandbox.id == box.id
            assert (await services.sandboxes.get(box.id)).state is SandboxState.running

    run(main())


def test_rate_info_and_limited_error() -> None:
    bucket = TokenBucket(rate=1.0, burst=2)
    info = bucket.info("t")
    assert (info.limit, info.remaining) == (2, 2)
    bucket.take("t")
    bucket.take("t")
    with pytest.raises(TokenRateLimited) as caught:
        bucket.take("t")
    assert isinstance(caught.value, RateLimited)
    assert caught.value.info.remaining == 0 and caught.value.info.reset >= int(time.time())


class Body(BaseModel):
    x: int


def test_face_router_renders_its_own_errors() -> None:
    def render(request: Request, problem: Problem) -> Response:
        return JSONResponse({"oops": problem.code, "m": problem.message}, problem.status)

    router = face_router("test", render)

    @router.post("/face")
    async def face(body: Body) -> dict[str, int]:
        if body.x == 0:
            raise NotFound("nothing")
        return {"x": body.x}

    app = FastAPI()
    app.include_router(router)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/face", json={"x": 1})).json() == {"x": 1}
            missing = await client.post("/face", json={"x": 0})
            assert missing.status_code == 404
            assert missing.json() == {"oops": "not_found", "m": "nothing"}
            invalid = await client.post("/face", json={"x": "no"})
            assert invalid.status_code == 422 and invalid.json()["oops"] == "invalid_argument"
            bad = await client.post(
                "/face", content=b"{", headers={"content-type": "application/json"}
            )
            assert bad.status_code == 400 and bad.json()["oops"] == "invalid_json"

    run(main())


def test_shell_exit_code() -> None:
    def command(status: CommandStatus, **fields: Any) -> Command:
        base = {"id": "cmd_x", "sandbox_id": "sb_x", "command": "x", "cwd": "/", "timeout_ms": 1,
                "max_output_bytes": 1, "created_at": "2024-01-01T00:00:00Z"}  # fmt: skip
        return Command.model_validate({**base, "status": status, **fields})

    assert shell_exit_code(command(CommandStatus.completed, exit_code=3)) == 3
    assert shell_exit_code(command(CommandStatus.completed, signal=15)) == 143
    assert shell_exit_code(command(CommandStatus.timed_out)) == 137
    assert shell_exit_code(command(CommandStatus.lost)) is None


def test_token_create_with_no_scopes_is_allowed() -> None:
    assert TokenCreate(scopes=[], sandbox_ids=[]).scopes == []
