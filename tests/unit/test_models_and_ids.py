"""Identifiers, pagination cursors, state transitions and request validation."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from pydantic import ValidationError

from corral import ids
from corral.core.errors import BadRequest
from corral.core.models import (
    CommandStatus,
    ExecRequest,
    SandboxCreate,
    SandboxState,
    Scope,
    TokenCreate,
)
from corral.core.paging import decode_cursor, encode_cursor

ID_BODY = re.compile(r"^[0-9a-hjkmnp-tv-z]{26}$")  # Crockford base32: no i, l, o, u

# --- ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [ids.SANDBOX, ids.COMMAND, ids.TOKEN])
def test_ids_carry_their_prefix(prefix: str) -> None:
    value = ids.new_id(prefix)
    head, _, body = value.partition("_")
    assert head == prefix
    assert ID_BODY.match(body), value


def test_ids_are_unique() -> None:
    many = [ids.new_id("cmd") for _ in range(2000)]
    assert len(set(many)) == len(many)


def test_ids_sort_in_creation_order_across_milliseconds() -> None:
    created = []
    for _ in range(5):
        created.append(ids.new_id("sb"))
        time.sleep(0.002)
    assert sorted(created) == created


def test_id_time_part_grows_with_the_clock() -> None:
    before = ids.new_id("sb")[3:13]
    time.sleep(0.002)
    after = ids.new_id("sb")[3:13]
    assert after > before


def test_ids_sort_in_creation_order_within_a_millisecond() -> None:
    created = [ids.new_id("cmd") for _ in range(200)]
    assert sorted(created) == created


# --- cursors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [ids.new_id("sb"), ids.new_id("cmd"), "tok_0", "sb_zz"])
def test_cursor_round_trip(value: str) -> None:
    cursor = encode_cursor(value)
    assert "=" not in cursor
    assert re.fullmatch(r"[A-Za-z0-9_-]+", cursor)
    assert decode_cursor(cursor) == value


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "!!!",
        "a",  # not a possible base64 length
        "é",
        "%%%",
        "c2JfMA==",  # padded form of a valid cursor
        "c2JfMB",  # same bytes as "c2JfMA", not the canonical spelling
        encode_cursor("not an id"),
        encode_cursor("SB_UPPER"),
        encode_cursor("sb_"),
        encode_cursor("sb_" + "a" * 65),
        "__4",  # bytes that are not ASCII
    ],
)
def test_garbage_cursors_are_bad_requests(cursor: str) -> None:
    with pytest.raises(BadRequest):
        decode_cursor(cursor)


def test_canonical_cursor_of_the_aliases_decodes() -> None:
    assert decode_cursor("c2JfMA") == "sb_0"


# --- sandbox states ----------------------------------------------------------------------------


def test_deleted_is_terminal() -> None:
    assert not any(SandboxState.deleted.can_become(s) for s in SandboxState)


def test_every_live_state_can_be_deleted() -> None:
    for state in SandboxState:
        if state != SandboxState.deleted:
            assert state.can_become(SandboxState.deleted), state


@pytest.mark.parametrize(
    ("old", "new", "allowed"),
    [
        ("stopped", "creating", True),
        ("stopped", "running", False),  # a stopped sandbox starts through creating
        ("error", "creating", True),
        ("error", "stopped", False),
        ("creating", "running", True),
        ("creating", "stopped", False),
        ("running", "creating", True),  # restarted after a crash
        ("running", "stopped", True),
        ("running", "running", False),
        ("paused", "running", True),
        ("paused", "creating", True),
    ],
)
def test_sandbox_transitions(old: str, new: str, allowed: bool) -> None:
    assert SandboxState(old).can_become(SandboxState(new)) is allowed


def test_finished_command_statuses() -> None:
    unfinished = {s for s in CommandStatus if not s.finished}
    assert unfinished == {CommandStatus.queued, CommandStatus.running}


# --- request validation ------------------------------------------------------------------------


def test_exec_request_defaults() -> None:
    req = ExecRequest(command="echo hi")
    assert [req.args, req.cwd, req.user, req.stdin, req.timeout_ms] == [None] * 5
    assert req.env == {}


@pytest.mark.parametrize("key", ["1ABC", "A-B", "A B", "", "A=B", "É"])
def test_exec_request_rejects_bad_env_names(key: str) -> None:
    with pytest.raises(ValidationError):
        ExecRequest(command="true", env={key: "x"})


@pytest.mark.parametrize("key", ["A", "_x", "PATH_2", "lower"])
def test_exec_request_accepts_env_names(key: str) -> None:
    assert ExecRequest(command="true", env={key: "v"}).env == {key: "v"}


@pytest.mark.parametrize(
    "fields",
    [
        {"command": "echo \x00"},
        {"command": "echo", "args": ["ok", "b\x00d"]},
        {"command": "true", "cwd": "/work\x00space"},
        {"command": "cat", "stdin": "in\x00put"},
        {"command": "true", "env": {"KEY": "va\x00lue"}},
    ],
)
def test_exec_request_rejects_nul_bytes(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ExecRequest(**fields)


@pytest.mark.parametrize("cwd", ["workspace", "./x", "", "~/x"])
def test_exec_request_rejects_relative_cwd(cwd: str) -> None:
    with pytest.raises(ValidationError):
        ExecRequest(command="true", cwd=cwd)


def test_exec_request_accepts_absolute_cwd() -> None:
    assert ExecRequest(command="true", cwd="/tmp").cwd == "/tmp"


@pytest.mark.parametrize("user", ["User", "1001", "", "a b", "../x", "-u", "x" * 33])
def test_exec_request_only_allows_user_names(user: str) -> None:
    with pytest.raises(ValidationError):
        ExecRequest(command="true", user=user)


@pytest.mark.parametrize(
    ("user", "normal"),
    [("user", "user"), ("1000", "user"), ("root", "root"), ("0", "root"), ("nobody", "nobody"),
     ("_apt", "_apt"), ("build-1", "build-1")],
)  # fmt: skip
def test_exec_request_accepts_the_sandbox_users(user: str, normal: str) -> None:
    assert ExecRequest(command="true", user=user).user == normal


@pytest.mark.parametrize(
    "fields",
    [
        {"command": ""},
        {"command": "true", "timeout_ms": 0},
        {"command": "true", "max_output_bytes": -1},
        {"command": "true", "shell": "zsh"},  # unknown fields are refused, not ignored
    ],
)
def test_exec_request_rejects_bad_fields(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ExecRequest(**fields)


def test_zero_output_cap_is_allowed() -> None:
    assert ExecRequest(command="true", max_output_bytes=0).max_output_bytes == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "-leading-dash"},
        {"name": "a" * 64},
        {"name": "has space"},
        {"env": {"9X": "1"}},
        {"network": "host"},
        {"memory_mb": 15},
        {"cpu": 0},
        {"ttl_seconds": 0},
    ],
)
def test_sandbox_create_rejects(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SandboxCreate(**fields)


def test_sandbox_create_accepts_a_name() -> None:
    assert SandboxCreate(name="build-1.x_y").name == "build-1.x_y"
    assert SandboxCreate(name="a" * 63).name == "a" * 63


def test_token_create_defaults_and_bounds() -> None:
    req = TokenCreate()
    assert set(req.scopes) == {Scope.read, Scope.exec, Scope.files}
    assert req.sandbox_ids is None and req.expires_in_seconds is None
    with pytest.raises(ValidationError):
        TokenCreate(expires_in_seconds=0)
    with pytest.raises(ValidationError):
        TokenCreate(scopes=["root"])
