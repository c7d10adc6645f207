"""`corral webhooks ...`: URLs that get signed events, and their delivery attempts.

    corral webhooks create URL -e command.finished [-e sandbox.state] [--sandbox REF] [--secret S]
    corral webhooks list | delete ID... | deliveries ID [--limit N]

This module does not import `corral.cli.main` (it is registered from there): it reads the URL
and token from the context object that `main` sets.
"""

from __future__ import annotations

import click
from rich.table import Table

from corral.cli import _output as output
from corral.client import Client
from corral.core.webhook_wire import Webhook, WebhookAttempt

EVENTS = ("command.finished", "sandbox.state")


def _client(ctx: click.Context) -> Client:
    connection = ctx.find_root().obj
    return Client(getattr(connection, "url", None), token=getattr(connection, "token", None))


def webhook_table(hooks: list[Webhook]) -> Table:
    table = output._table("ID", "URL", "EVENTS", "SANDBOX", "CREATED")
    for hook in hooks:
        table.add_row(
            hook.id,
            hook.url,
            ", ".join(hook.events),
            hook.sandbox or "-",
            output.when(hook.created_at),
        )
    return table


def attempt_table(attempts: list[WebhookAttempt]) -> Table:
    table = output._table("AT", "EVENT", "TYPE", "ATTEMPT", "ANSWER", "MS", "NEXT RETRY")
    for a in attempts:
        answer = str(a.status_code) if a.status_code is not None and a.error is None else a.error
        table.add_row(
            output.when(a.at),
            a.event_id,
            a.event_type,
            str(a.attempt),
            answer or "-",
            str(a.duration_ms),
            output.when(a.next_retry_at),
        )
    return table


@click.group()
def webhooks() -> None:
    """Webhooks: signed command.finished and sandbox.state events POSTed to a URL."""


@webhooks.command("create")
@click.argument("url")
@click.option("-e", "--event", "events", multiple=True, required=True,
              type=click.Choice(EVENTS), help="An event to deliver (repeatable).")  # fmt: skip
@click.option("--sandbox", metavar="REF", help="Only this sandbox's events.")
@click.option("--secret", help="The signing secret [default: a random one, printed once].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def webhooks_create(
    ctx: click.Context,
    url: str,
    events: tuple[str, ...],
    sandbox: str | None,
    secret: str | None,
    as_json: bool,
) -> None:
    """Create a webhook; prints its id, then its signing secret (shown this once)."""
    with _client(ctx) as client:
        made = client.create_webhook(url, events, sandbox=sandbox, secret=secret)
    if as_json:
        output.print_json(made)
        return
    click.echo(f"Created webhook {made.id}. Its signing secret, shown once:", err=True)
    click.echo(made.secret)


@webhooks.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def webhooks_list(ctx: click.Context, as_json: bool) -> None:
    """List webhooks (never their secrets)."""
    with _client(ctx) as client:
        hooks = client.list_webhooks()
    if as_json:
        output.print_json(hooks)
    else:
        output.print_table(webhook_table(hooks))


@webhooks.command("delete")
@click.argument("webhook_ids", nargs=-1, required=True, metavar="ID...")
@click.pass_context
def webhooks_delete(ctx: click.Context, webhook_ids: tuple[str, ...]) -> None:
    """Delete webhooks (their pending deliveries too); prints each deleted id."""
    with _client(ctx) as client:
        for webhook_id in webhook_ids:
            client.delete_webhook(webhook_id)
            click.echo(webhook_id)


@webhooks.command("deliveries")
@click.argument("webhook_id", metavar="ID")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many attempts.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def webhooks_deliveries(
    ctx: click.Context, webhook_id: str, limit: int | None, as_json: bool
) -> None:
    """Every delivery attempt, newest first: when, answer or error, duration, next retry."""
    with _client(ctx) as client:
        attempts = client.list_webhook_deliveries(webhook_id, limit=limit)
    if as_json:
        output.print_json(attempts)
    else:
        output.print_table(attempt_table(attempts))
