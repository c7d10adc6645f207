"""`corral user ...`: cmd.io users, their named commands, access lists and tokens (admin key).

    corral user create NAME [--key 'ssh-ed25519 AAAA...']...
    corral user ls | show NAME | rm NAME
    corral user command create USER NAME [-e K=V]... [--timeout S] [--sandbox REF] -- CMD...
    corral user command ls USER | show USER NAME | rm USER NAME
    corral user access add|rm USER NAME TOKEN ; corral user access ls USER NAME
    corral user token new|ls USER ; corral user token rm USER TOKEN

This module does not import `corral.cli.main` (it is registered from there): it reads the URL
and token from the context object that `main` sets.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import click
import httpx

from corral.cli import _output as output
from corral.client import Client
from corral.client._base import Call


def _client(ctx: click.Context) -> Client:
    connection = ctx.find_root().obj
    return Client(getattr(connection, "url", None), token=getattr(connection, "token", None))


def _json(response: httpx.Response) -> Any:
    return response.json() if response.content else None


def _call(ctx: click.Context, method: str, path: str, body: Any = None) -> Any:
    with _client(ctx) as client:
        return client._send(Call(method, path, _json, json=body))


def _p(value: str) -> str:
    return quote(value, safe="")


def _pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx=ctx, param=param)
        result[key] = value
    return result


def _show(value: Any, as_json: bool, table: Callable[[Any], list[list[str]]]) -> None:
    if as_json:
        click.echo(json.dumps(value, indent=2))
        return
    rows = table(value)
    if rows:
        out = output._table(*rows[0])
        for row in rows[1:]:
            out.add_row(*row)
        output.print_table(out)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")


@click.group()
def user() -> None:
    """cmd.io users, their named commands, access lists and tokens (admin key)."""


@user.command("create")
@click.argument("name")
@click.option("--key", "keys", multiple=True, metavar="PUBKEY", help="SSH public key (repeat).")
@json_option
@click.pass_context
def user_create(ctx: click.Context, name: str, keys: tuple[str, ...], as_json: bool) -> None:
    """Create a user who signs in over SSH with their keys."""
    made = _call(ctx, "POST", "/v1/users", {"name": name, "ssh_public_keys": list(keys)})
    click.echo(json.dumps(made, indent=2) if as_json else made["name"])


@user.command("ls")
@json_option
@click.pass_context
def user_ls(ctx: click.Context, as_json: bool) -> None:
    """List users."""
    users = _call(ctx, "GET", "/v1/users")
    _show(users, as_json, lambda us: [["NAME", "KEYS", "CREATED"]]
          + [[u["name"], str(len(u["ssh_public_keys"])), u["created_at"]] for u in us])  # fmt: skip


@user.command("show")
@click.argument("name")
@click.pass_context
def user_show(ctx: click.Context, name: str) -> None:
    """Show a user (JSON)."""
    click.echo(json.dumps(_call(ctx, "GET", f"/v1/users/{_p(name)}"), indent=2))


@user.command("rm")
@click.argument("name")
@click.pass_context
def user_rm(ctx: click.Context, name: str) -> None:
    """Delete a user with their commands and their cmd.io tokens."""
    _call(ctx, "DELETE", f"/v1/users/{_p(name)}")
    click.echo(name)


@user.group("command")
def command() -> None:
    """A user's named commands."""


@command.command("create")
@click.argument("owner")
@click.argument("name")
@click.argument("line", nargs=-1, required=True, metavar="-- CMD...")
@click.option("-e", "--env", multiple=True, callback=_pairs, metavar="K=V", help="Env var.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS")
@click.option("--sandbox", metavar="REF", help="Run in this sandbox instead of a fresh one.")
@click.option("--description", default="")
@json_option
@click.pass_context
def command_create(
    ctx: click.Context,
    owner: str,
    name: str,
    line: tuple[str, ...],
    env: dict[str, str],
    timeout: float | None,
    sandbox: str | None,
    description: str,
    as_json: bool,
) -> None:
    """Publish a command: CMD is a shell command line (several words are joined)."""
    body: dict[str, Any] = {"name": name, "command": " ".join(line), "env": env,
                            "description": description}  # fmt: skip
    if timeout is not None:
        body["timeout_ms"] = max(1, round(timeout * 1000))
    if sandbox:
        body["sandbox"] = sandbox
    made = _call(ctx, "POST", f"/v1/users/{_p(owner)}/commands", body)
    click.echo(json.dumps(made, indent=2) if as_json else f"{made['owner']}/{made['name']}")


@command.command("ls")
@click.argument("owner")
@json_option
@click.pass_context
def command_ls(ctx: click.Context, owner: str, as_json: bool) -> None:
    """List a user's commands."""
    found = _call(ctx, "GET", f"/v1/users/{_p(owner)}/commands")
    _show(found, as_json, lambda cs: [["NAME", "COMMAND", "SANDBOX"]]
          + [[c["name"], c["command"], c["sandbox_id"] or "fresh"] for c in cs])  # fmt: skip


@command.command("show")
@click.argument("owner")
@click.argument("name")
@json_option
@click.pass_context
def command_show(ctx: click.Context, owner: str, name: str, as_json: bool) -> None:
    """Show one command."""
    found = _call(ctx, "GET", f"/v1/users/{_p(owner)}/commands/{_p(name)}")
    _show(found, as_json, lambda c: [["FIELD", "VALUE"]]
          + [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in c.items()])  # fmt: skip


@command.command("rm")
@click.argument("owner")
@click.argument("name")
@click.pass_context
def command_rm(ctx: click.Context, owner: str, name: str) -> None:
    """Delete a command."""
    _call(ctx, "DELETE", f"/v1/users/{_p(owner)}/commands/{_p(name)}")
    click.echo(f"{owner}/{name}")


@user.group("access")
def access() -> None:
    """Who may run a command (`<name>:access` over SSH)."""


@access.command("add")
@click.argument("owner")
@click.argument("name")
@click.argument("token")
@click.pass_context
def access_add(ctx: click.Context, owner: str, name: str, token: str) -> None:
    """Let TOKEN (a secret or a token id) run OWNER/NAME."""
    _call(ctx, "POST", f"/v1/users/{_p(owner)}/commands/{_p(name)}/access", {"token": token})
    click.echo("Access granted.")


@access.command("rm")
@click.argument("owner")
@click.argument("name")
@click.argument("token")
@click.pass_context
def access_rm(ctx: click.Context, owner: str, name: str, token: str) -> None:
    """Take TOKEN's access to OWNER/NAME away."""
    _call(ctx, "DELETE", f"/v1/users/{_p(owner)}/commands/{_p(name)}/access/{_p(token)}")
    click.echo("Access revoked.")


@access.command("ls")
@click.argument("owner")
@click.argument("name")
@json_option
@click.pass_context
def access_ls(ctx: click.Context, owner: str, name: str, as_json: bool) -> None:
    """The tokens that may run OWNER/NAME."""
    found = _call(ctx, "GET", f"/v1/users/{_p(owner)}/commands/{_p(name)}/access")
    _show(found, as_json, lambda es: [["TOKEN", "PREFIX", "SINCE"]]
          + [[e["token_id"], e["prefix"], e["created_at"]] for e in es])  # fmt: skip


@user.group("token")
def token() -> None:
    """A user's cmd.io tokens (`cmd-tokens` over SSH)."""


@token.command("new")
@click.argument("owner")
@click.pass_context
def token_new(ctx: click.Context, owner: str) -> None:
    """Make a token that runs only the commands whose access lists hold it."""
    made = _call(ctx, "POST", f"/v1/users/{_p(owner)}/tokens")
    click.echo(f"Created token {made['id']}. Its secret, shown once:", err=True)
    click.echo(made["secret"])


@token.command("ls")
@click.argument("owner")
@json_option
@click.pass_context
def token_ls(ctx: click.Context, owner: str, as_json: bool) -> None:
    """List a user's cmd.io tokens."""
    found = _call(ctx, "GET", f"/v1/users/{_p(owner)}/tokens")
    _show(found, as_json, lambda ts: [["ID", "PREFIX", "CREATED"]]
          + [[t["id"], t["prefix"], t["created_at"]] for t in ts])  # fmt: skip


@token.command("rm")
@click.argument("owner")
@click.argument("token_ref", metavar="TOKEN")
@click.pass_context
def token_rm(ctx: click.Context, owner: str, token_ref: str) -> None:
    """Delete one of the user's cmd.io tokens (by id or secret)."""
    _call(ctx, "DELETE", f"/v1/users/{_p(owner)}/tokens/{_p(token_ref)}")
    click.echo(token_ref)
