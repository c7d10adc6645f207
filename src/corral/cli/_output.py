"""How the CLI shows things: rich tables for people, JSON for scripts, raw bytes for output."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import click
import pydantic
from rich import box
from rich.console import Console
from rich.table import Table

from corral.client import APIError, CorralError
from corral.core.models import AuditEntry, Image, Node, Sandbox, Snapshot, Token, Volume


def print_table(table: Table) -> None:
    if sys.stdout.isatty():
        Console(highlight=False).print(table)
        return
    # Piped: as wide as the rows need (a default 80 columns would wrap ids mid-way), and no
    # trailing padding to trip up line-based tools.
    console = Console(width=1_000, highlight=False, no_color=True)
    with console.capture() as captured:
        console.print(table)
    for line in captured.get().splitlines():
        click.echo(line.rstrip())


def print_json(value: pydantic.BaseModel | Sequence[pydantic.BaseModel]) -> None:
    if isinstance(value, pydantic.BaseModel):
        data: Any = value.model_dump(mode="json")
    else:
        data = [item.model_dump(mode="json") for item in value]
    click.echo(json.dumps(data, indent=2))


def write_raw(text: str | None, *, err: bool = False) -> None:
    """Write a command's output as it was produced: no decoration, no added newline."""
    if not text:
        return
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = text.encode("utf-8", "replace")
    stream = click.get_binary_stream("stderr" if err else "stdout")
    stream.write(data)
    stream.flush()


def error_line(exc: CorralError) -> str:
    """`error: <code>: <message>`, plus the invalid fields when the API names them."""
    if not isinstance(exc, APIError):
        return f"error: {exc}"
    line = f"error: {exc.code}: {exc.message}"
    problems = _field_problems(exc.details)
    return f"{line} ({problems})" if problems else line


def _field_problems(details: Any) -> str:
    if not isinstance(details, list):
        return ""
    parts = []
    for item in details:
        if isinstance(item, dict) and "msg" in item:
            location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            parts.append(f"{location}: {item['msg']}" if location else str(item["msg"]))
    return "; ".join(parts)


def when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def pairs(mapping: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in mapping.items()) or "-"


def sandbox_table(sandboxes: Iterable[Sandbox]) -> Table:
    table = _table("ID", "NAME", "STATE", "TEMPLATE", "CREATED", "EXPIRES", "LABELS")
    for sandbox in sandboxes:
        table.add_row(
            sandbox.id,
            sandbox.name or "-",
            sandbox.state.value,
            sandbox.template,
            when(sandbox.created_at),
            when(sandbox.expires_at),
            pairs(sandbox.labels),
        )
    return table


def sandbox_details(sandbox: Sandbox) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    limits = {
        "cpu": sandbox.cpu,
        "memory_mb": sandbox.memory_mb,
        "pids": sandbox.pids,
        "disk_mb": sandbox.disk_mb,
    }
    rows = [
        ("id", sandbox.id),
        ("name", sandbox.name or "-"),
        ("state", sandbox.state.value),
        ("node", sandbox.node_id),
        ("template", sandbox.template),
        ("network", sandbox.network),
        ("limits", ", ".join(f"{k}={v}" for k, v in limits.items() if v is not None) or "-"),
        ("env", ", ".join(sandbox.env_keys) or "-"),
        ("labels", pairs(sandbox.labels)),
        ("ttl", f"{sandbox.ttl_seconds}s" if sandbox.ttl_seconds else "-"),
        ("created", when(sandbox.created_at)),
        ("updated", when(sandbox.updated_at)),
        ("expires", when(sandbox.expires_at)),
    ]
    if sandbox.snapshot:
        rows.insert(5, ("snapshot", sandbox.snapshot))
    if sandbox.error:
        rows.append(("error", sandbox.error))
    for key, value in rows:
        table.add_row(key, value)
    return table


def token_table(tokens: Iterable[Token]) -> Table:
    table = _table("ID", "NAME", "PREFIX", "SCOPES", "SANDBOXES", "CREATED", "EXPIRES", "LAST USED")
    for token in tokens:
        table.add_row(
            token.id,
            token.name or "-",
            token.prefix,
            ",".join(scope.value for scope in token.scopes),
            ",".join(token.sandbox_ids) if token.sandbox_ids is not None else "all",
            when(token.created_at),
            when(token.expires_at),
            when(token.last_used_at),
        )
    return table


def audit_table(entries: Iterable[AuditEntry]) -> Table:
    table = _table("AT", "TOKEN", "ACTION", "TARGET", "STATUS", "RESULT", "ADDRESS")
    for e in entries:
        who = e.token_id or "-"
        if e.token_name and e.token_name != e.token_id:
            who += f" ({e.token_name})"
        table.add_row(when(e.at), who, e.action, e.target or "-", str(e.status), e.result,
                      e.address or "-")  # fmt: skip
    return table


def node_table(nodes: Iterable[Node]) -> Table:
    table = _table("ID", "STATE", "SANDBOXES", "COMMANDS", "CPUS", "MEMORY", "VERSION", "SEEN")
    for node in nodes:
        table.add_row(
            node.id,
            node.state.value,
            f"{node.sandboxes}/{node.capacity.sandboxes}",
            str(node.running_commands),
            f"{node.capacity.cpus:g}",
            f"{node.capacity.memory_mb // 1024} GiB",
            node.version,
            when(node.last_heartbeat),
        )
    return table


def volume_table(volumes: Iterable[Volume]) -> Table:
    table = _table("ID", "NAME", "NODE", "SIZE", "USED BY", "CREATED")
    for volume in volumes:
        table.add_row(
            volume.id,
            volume.name,
            volume.node_id,
            f"{volume.size_mb} MiB" if volume.size_mb else "-",
            ", ".join(volume.used_by) or "-",
            when(volume.created_at),
        )
    return table


def snapshot_table(snapshots: Iterable[Snapshot]) -> Table:
    table = _table(
        "ID", "NAME", "STATE", "SANDBOX", "NODE", "SIZE", "USED BY", "CREATED", "EXPIRES"
    )
    for snapshot in snapshots:
        table.add_row(
            snapshot.id,
            snapshot.name or "-",
            snapshot.state.value,
            snapshot.sandbox_id,
            snapshot.node_id,
            size(snapshot.size_bytes),
            ", ".join(snapshot.used_by) or "-",
            when(snapshot.created_at),
            when(snapshot.expires_at) if snapshot.expires_at else "-",
        )
    return table


def image_table(images: Iterable[Image]) -> Table:
    table = _table("ID", "REFERENCES", "NODE", "SIZE", "LAYERS", "USED BY", "ADDED")
    for image in images:
        table.add_row(
            image.id.removeprefix("sha256:")[:12],
            "\n".join(image.references) or "-",
            image.node_id,
            size(image.size),
            str(image.layers),
            ", ".join(image.used_by) or "-",
            when(image.added_at),
        )
    return table


def size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=column == "ID", overflow="fold")
    return table
