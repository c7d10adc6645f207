"""The `corral` command: run the server, and drive one over its API with the SDK."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import pydantic

from corral import __version__
from corral.cli import _output as output
from corral.cli import live
from corral.client import Client, CorralError
from corral.core.models import Command, CommandStatus, Sandbox, SandboxState, Scope

F = TypeVar("F", bound=Callable[..., Any])

# Exit statuses of `corral exec` that are not the command's own (as timeout(1) and shells use).
EXIT_API_ERROR = 1
EXIT_TIMED_OUT = 124
EXIT_NOT_RUN = 125
EXIT_CANCELLED = 130


class Failure(click.ClickException):
    """An error already worded for the user: printed as is, exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(self.message, err=True)


class CorralGroup(click.Group):
    """Turns SDK errors from any subcommand into `error: <code>: <message>` and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CorralError as exc:
            raise Failure(output.error_line(exc)) from exc


@dataclass(frozen=True)
class Connection:
    url: str | None
    token: str | None

    def client(self) -> Client:
        return Client(self.url, token=self.token)


pass_connection = click.make_pass_decorator(Connection)


def json_option(function: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")(
        function
    )


def parse_mounts(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[dict[str, object]]:
    mounts: list[dict[str, object]] = []
    for value in values:
        name, _, rest = value.partition(":")
        path, _, mode = rest.partition(":")
        if not name or not path or mode not in ("", "ro", "rw"):
            raise click.BadParameter(f"{value!r} is not NAME:PATH or NAME:PATH:ro")
        mounts.append({"name": name, "path": path, "read_only": mode == "ro"})
    return mounts


def parse_pairs(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """`K=V` options into a dict (later ones win)."""
    result: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx=ctx, param=param)
        result[key] = value
    return result


@click.group(cls=CorralGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="CORRAL_URL",
    show_envvar=True,
    metavar="URL",
    help="Server to talk to [default: http://127.0.0.1:8700].",
)
@click.option(
    "--token", envvar="CORRAL_TOKEN", show_envvar=True, metavar="TOKEN", help="API token."
)
@click.version_option(__version__, "-V", "--version", prog_name="corral")
@click.pass_context
def main(ctx: click.Context, url: str | None, token: str | None) -> None:
    """Corral: isolated sandboxes that run commands over HTTP."""
    ctx.obj = Connection(url=url or None, token=token or None)


# --- serve -------------------------------------------------------------------------------------


@main.command()
@click.option("--host", help="Address to listen on [env: CORRAL_HOST; default 127.0.0.1].")
@click.option("--port", type=int, help="Port to listen on [env: CORRAL_PORT; default 8700].")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Store, logs and sandboxes [env: CORRAL_DATA_DIR; default ./data].",
)
@click.option(
    "--database-url",
    help="SQLAlchemy async URL [env: CORRAL_DATABASE_URL; default SQLite in the data dir].",
)
@click.option(
    "--admin-key",
    help="Admin token [env: CORRAL_ADMIN_KEY; default generated once, kept in the data dir]. "
    "Prefer the variable: arguments are visible to other users.",
)
@click.option(
    "--runtime",
    type=click.Choice(["namespaces", "fake"]),
    help="Sandbox backend [env: CORRAL_RUNTIME; default namespaces].",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug", "trace"], False),
    help="Log level [env: CORRAL_LOG_LEVEL; default info].",
)
@click.option(
    "--ssh-port", type=int, help="SSH front for named commands [env: CORRAL_SSH_PORT; default off]."
)
@click.option(
    "--nats-url",
    help="NATS of a fleet: this server is one API replica [env: CORRAL_NATS_URL; default none].",
)
@click.option("--nats-creds", help="NATS credentials file [env: CORRAL_NATS_CREDS].")
@click.option(
    "--no-local-node",
    "local_node",
    flag_value=False,
    default=None,
    help="Run no sandboxes here: an API replica of a fleet only [env: CORRAL_LOCAL_NODE=false].",
)
@click.option("--node-id", help="This server's node id [env: CORRAL_NODE_ID; default local].")
def serve(**options: Any) -> None:
    """Run the server: API, store and local node. Every option also reads CORRAL_<OPTION>."""
    from corral.cli.serve import run_server

    run_server(settings=_settings(options))


def _settings(options: dict[str, Any]) -> Any:
    from corral.settings import Settings

    overrides = {key: value for key, value in options.items() if value is not None}
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        raise click.UsageError(f"invalid settings: {exc}") from exc


@main.command()
@click.option("--nats-url", help="The fleet's NATS [env: CORRAL_NATS_URL].")
@click.option("--node-id", help="This node's id, unique in the fleet [env: CORRAL_NODE_ID].")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Sandboxes and logs of this node [env: CORRAL_DATA_DIR; default ./data].",
)
@click.option("--nats-creds", help="This node's NATS credentials file [env: CORRAL_NATS_CREDS].")
@click.option(
    "--host-exec",
    "host_exec_user",
    metavar="USER",
    help="Also run CMDOP host commands, as this unprivileged host user [default: refused].",
)
@click.option(
    "--runtime",
    type=click.Choice(["namespaces", "fake"]),
    help="Sandbox backend [env: CORRAL_RUNTIME; default namespaces].",
)
@click.option("--uid-base", type=int, help="First host uid of this node's sandboxes.")
@click.option("--cgroup-root", help="cgroup directory of this node's sandboxes.")
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"], False),
    help="Log level [env: CORRAL_LOG_LEVEL; default info].",
)
def agent(**options: Any) -> None:
    """Run a node of a fleet on this host: it dials out to NATS (no inbound port) and runs the
    sandboxes the API replicas place on it."""
    import asyncio
    import logging.config
    import signal

    import uvloop

    from corral.node.agent import serve_node
    from corral.redaction import Redactor, log_config

    settings = _settings(options)
    # Through the redacting filter, as the server's: a NATS URL may hold a password.
    logging.config.dictConfig(
        log_config(settings.log_level, Redactor([settings.nats_url]), settings.log_format)
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_node(settings, stop)

    uvloop.run(run())


# --- sandboxes ---------------------------------------------------------------------------------


@main.group()
def sandbox() -> None:
    """Create, list, inspect, stop, start and delete sandboxes."""


@sandbox.command("create")
@click.option("--name", help="Unique name, usable wherever an id is.")
@click.option("--template", help="Root filesystem template [server default: host].")
@click.option("--image", metavar="REF|ID", help="Start from a container image, not a template.")
@click.option(
    "-e", "--env", multiple=True, callback=parse_pairs, metavar="K=V", help="Env for every command."
)
@click.option("-l", "--label", multiple=True, callback=parse_pairs, metavar="K=V", help="Label.")
@click.option("--ttl", type=click.IntRange(min=1), metavar="SECONDS", help="Delete after.")
@click.option("--cpu", type=float, help="CPU quota, in CPUs.")
@click.option("--memory-mb", type=int, help="Memory limit (MiB).")
@click.option("--pids", type=int, help="Process limit.")
@click.option("--disk-mb", type=int, help="Disk limit (MiB).")
@click.option("--node", metavar="ID", help="Place it on this node [default: least loaded].")
@click.option(
    "-v",
    "--volume",
    "volumes",
    multiple=True,
    callback=parse_mounts,
    metavar="NAME:PATH[:ro]",
    help="Mount a volume (repeatable); the sandbox goes to its node.",
)
@click.option(
    "--snapshot",
    metavar="NAME|ID",
    help="Start from a snapshot, on its node, with its source's template.",
)
@json_option
@pass_connection
def sandbox_create(
    connection: Connection,
    name: str | None,
    template: str | None,
    image: str | None,
    env: dict[str, str],
    label: dict[str, str],
    ttl: int | None,
    cpu: float | None,
    memory_mb: int | None,
    pids: int | None,
    disk_mb: int | None,
    node: str | None,
    volumes: list[dict[str, object]],
    snapshot: str | None,
    as_json: bool,
) -> None:
    """Create a sandbox and print its id."""
    with connection.client() as client:
        created = client.create_sandbox(
            snapshot=snapshot,
            image=image,
            node=node,
            volumes=volumes or None,
            name=name,
            template=template,
            env=env,
            labels=label,
            cpu=cpu,
            memory_mb=memory_mb,
            pids=pids,
            disk_mb=disk_mb,
            ttl_seconds=ttl,
        )
    if as_json:
        output.print_json(created)
    else:
        click.echo(created.id)


@sandbox.command("ls")
@click.option("--state", type=click.Choice([state.value for state in SandboxState]))
@click.option("--limit", type=click.IntRange(min=1), help="Show at most this many.")
@json_option
@pass_connection
def sandbox_ls(connection: Connection, state: str | None, limit: int | None, as_json: bool) -> None:
    """List sandboxes."""
    with connection.client() as client:
        sandboxes = client.list_sandboxes(state=state, limit=limit)
    if as_json:
        output.print_json(sandboxes)
    else:
        output.print_table(output.sandbox_table(sandboxes))


@sandbox.command("show")
@click.argument("ref")
@json_option
@pass_connection
def sandbox_show(connection: Connection, ref: str, as_json: bool) -> None:
    """Show one sandbox (by id or name)."""
    with connection.client() as client:
        found = client.get_sandbox(ref)
    if as_json:
        output.print_json(found)
    else:
        output.print_table(output.sandbox_details(found))


@sandbox.command("rm")
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@pass_connection
def sandbox_rm(connection: Connection, refs: tuple[str, ...]) -> None:
    """Delete sandboxes and everything in them; prints each deleted id."""
    failed = False
    with connection.client() as client:
        for ref in refs:
            # Go on with the others: one missing sandbox should not keep the rest alive.
            try:
                click.echo(client.delete_sandbox(ref).id)
            except CorralError as exc:
                click.echo(output.error_line(exc), err=True)
                failed = True
    if failed:
        raise click.exceptions.Exit(EXIT_API_ERROR)


@sandbox.command("stop")
@click.argument("ref")
@json_option
@pass_connection
def sandbox_stop(connection: Connection, ref: str, as_json: bool) -> None:
    """Stop a sandbox's processes; its files stay."""
    with connection.client() as client:
        stopped = client.stop_sandbox(ref)
    _print_state(stopped, as_json)


@sandbox.command("start")
@click.argument("ref")
@json_option
@pass_connection
def sandbox_start(connection: Connection, ref: str, as_json: bool) -> None:
    """Start a stopped sandbox."""
    with connection.client() as client:
        started = client.start_sandbox(ref)
    _print_state(started, as_json)


def _print_state(found: Sandbox, as_json: bool) -> None:
    if as_json:
        output.print_json(found)
    else:
        click.echo(f"{found.id} {found.state.value}")


# --- exec --------------------------------------------------------------------------------------


@main.command("exec")
@click.argument("sandbox_ref", metavar="SANDBOX")
@click.argument("command", nargs=-1, required=True, metavar="-- CMD...")
@click.option("--cwd", help="Working directory (absolute) [default: /workspace].")
@click.option("-e", "--env", multiple=True, callback=parse_pairs, metavar="K=V", help="Env var.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Kill the command after this long [server default].",
)
@click.option("--max-output-bytes", type=click.IntRange(min=0), help="Cap on each stream.")
@click.option("-i", "--stdin", "send_stdin", is_flag=True, help="Send local stdin to the command.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@click.option(
    "--stream", is_flag=True, help="Print the output as it comes (Ctrl-C detaches, not kills)."
)
@pass_connection
def exec_command(
    connection: Connection,
    sandbox_ref: str,
    command: tuple[str, ...],
    cwd: str | None,
    env: dict[str, str],
    timeout: float | None,
    max_output_bytes: int | None,
    send_stdin: bool,
    as_json: bool,
    stream: bool,
) -> None:
    """Run a command in a sandbox and wait for it.

    One CMD is a shell string (`corral exec box -- 'ls | wc -l'`); several are a program and its
    arguments, run without a shell. The command's stdout and stderr are copied to ours: at its
    end, or as it runs with --stream (a dropped connection is resumed where it stopped; Ctrl-C
    detaches and prints how to re-attach with `corral attach`).

    \b
    Exit status:
      N    the command's own exit status (128+N if killed by signal N)
      1    the API refused the request (error printed)
      124  the command timed out
      125  the command failed to start, or was lost
      130  the command was cancelled
    """
    stdin = _read_stdin() if send_stdin else None
    program, args = (command[0], None) if len(command) == 1 else (command[0], list(command[1:]))
    if stream:
        if as_json:
            raise click.UsageError("--stream and --json do not go together")
        with connection.client() as client:
            events = client.exec_stream(
                sandbox_ref,
                program,
                args=args,
                cwd=cwd,
                env=env or None,
                stdin=stdin,
                timeout_ms=None if timeout is None else max(1, round(timeout * 1000)),
                max_output_bytes=max_output_bytes,
            )
            live.follow_and_exit(sandbox_ref, events)
    with connection.client() as client:
        result = client.exec(
            sandbox_ref,
            program,
            args=args,
            cwd=cwd,
            env=env or None,
            stdin=stdin,
            timeout_ms=None if timeout is None else max(1, round(timeout * 1000)),
            max_output_bytes=max_output_bytes,
        )
    if as_json:
        output.print_json(result)
    else:
        _report(result)
    raise click.exceptions.Exit(exit_status(result))


def exit_status(command: Command) -> int:
    """The exit status `corral exec` gives for a command's result."""
    status = command.status
    if status is CommandStatus.completed:
        if command.exit_code is not None:
            return command.exit_code
        if command.signal is not None:
            return 128 + command.signal
        return EXIT_NOT_RUN
    if status is CommandStatus.timed_out:
        return EXIT_TIMED_OUT
    if status is CommandStatus.cancelled:
        return EXIT_CANCELLED
    return EXIT_NOT_RUN


def _report(result: Command) -> None:
    output.write_raw(result.stdout)
    output.write_raw(result.stderr, err=True)
    notes = []
    for stream in ("stdout", "stderr"):
        if getattr(result, f"{stream}_truncated"):
            total = getattr(result, f"{stream}_bytes")
            notes.append(
                f"corral: {stream} truncated to {result.max_output_bytes} of {total} bytes"
            )
    if result.status is CommandStatus.timed_out:
        notes.append(f"corral: command timed out after {result.timeout_ms / 1000:g}s")
    elif result.status is CommandStatus.cancelled:
        notes.append("corral: command was cancelled")
    elif result.status in (CommandStatus.failed, CommandStatus.lost):
        what = "failed to start" if result.status is CommandStatus.failed else "was lost"
        notes.append(f"error: command {what}: {result.error or 'no reason given'}")
    elif not result.status.finished:
        notes.append(f"error: command has not finished (status {result.status.value})")
    for note in notes:
        click.echo(note, err=True)


def _read_stdin() -> str:
    data = click.get_binary_stream("stdin").read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise click.UsageError("--stdin sends text: standard input is not valid UTF-8") from exc


# --- ports -------------------------------------------------------------------------------------


def parse_forward(value: str) -> tuple[int, int]:
    """`[LOCAL:]PORT` into (local, remote); LOCAL 0 (`:PORT`) takes any free port."""
    local, colon, remote = value.rpartition(":")
    try:
        remote_port = int(remote)
        local_port = int(local) if local else (0 if colon else remote_port)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not [LOCAL:]PORT") from None
    if not 1 <= remote_port <= 65535 or not 0 <= local_port <= 65535:
        raise click.BadParameter(f"{value!r}: ports are 1-65535")
    return local_port, remote_port


@main.command("port-forward")
@click.argument("sandbox")
@click.argument("ports", metavar="[LOCAL:]PORT")
@click.option("--address", default="127.0.0.1", show_default=True, help="Local address to bind.")
@pass_connection
def port_forward(conn: Connection, sandbox: str, ports: str, address: str) -> None:
    """Forward a local TCP port to PORT inside SANDBOX (any port; it need not be exposed).

    Each local connection is its own connection to 127.0.0.1:PORT in the sandbox, made inside
    its network namespace, so it works with "network": "none" too. Runs until interrupted.
    """
    import asyncio

    from corral.client._forward import PortForward

    local_port, remote_port = parse_forward(ports)
    with conn.client() as client:
        found = client.get_sandbox(sandbox)
        url = client._ws_url(f"/v1/sandboxes/{found.id}/tcp/{remote_port}")
        headers = client._ws_headers()

    def report(message: str) -> None:
        click.echo(f"error: {message}", err=True)

    async def run() -> None:
        forward = PortForward(url, headers, host=address, local_port=local_port, on_error=report)
        try:
            await forward.check()
        except ConnectionError as exc:
            if not str(exc).startswith("port_unreachable"):
                raise Failure(f"error: {exc}") from None
            report(f"{exc} (yet: forwarding anyway)")
        async with forward:
            click.echo(f"Forwarding from {address}:{forward.local_port} -> {remote_port}")
            await forward.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


# --- nodes -------------------------------------------------------------------------------------


@main.group()
def node() -> None:
    """List the hosts that run sandboxes; drain one before maintenance."""


@node.command("ls")
@json_option
@pass_connection
def node_ls(connection: Connection, as_json: bool) -> None:
    """List nodes with their state, load and last heartbeat."""
    with connection.client() as client:
        nodes = client.list_nodes()
    if as_json:
        output.print_json(nodes)
    else:
        output.print_table(output.node_table(nodes))


@node.command("drain")
@click.argument("node_id", metavar="ID")
@click.option("--undo", is_flag=True, help="Take new sandboxes again.")
@json_option
@pass_connection
def node_drain(connection: Connection, node_id: str, undo: bool, as_json: bool) -> None:
    """Stop placing new sandboxes on a node (its sandboxes keep running)."""
    with connection.client() as client:
        found = client.undrain_node(node_id) if undo else client.drain_node(node_id)
    if as_json:
        output.print_json(found)
    else:
        click.echo(f"{found.id} {found.state.value}")


@sandbox.command("fork")
@click.argument("ref", metavar="SANDBOX")
@click.option("--name", help="Unique name of the new sandbox.")
@click.option(
    "-e", "--env", multiple=True, callback=parse_pairs, metavar="K=V", help="Env for every command."
)
@click.option("-l", "--label", multiple=True, callback=parse_pairs, metavar="K=V", help="Label.")
@click.option("--ttl", type=click.IntRange(min=1), metavar="SECONDS", help="Stop after.")
@click.option("--cpu", type=float, help="CPU quota, in CPUs.")
@click.option("--memory-mb", type=int, help="Memory limit (MiB).")
@click.option("--pids", type=int, help="Process limit.")
@click.option("--disk-mb", type=int, help="Disk limit (MiB).")
@json_option
@pass_connection
def sandbox_fork(
    connection: Connection,
    ref: str,
    name: str | None,
    env: dict[str, str],
    label: dict[str, str],
    ttl: int | None,
    cpu: float | None,
    memory_mb: int | None,
    pids: int | None,
    disk_mb: int | None,
    as_json: bool,
) -> None:
    """Snapshot a running sandbox and start a new one from it; print the new one's id."""
    with connection.client() as client:
        forked = client.fork(
            ref,
            name=name,
            env=env or None,
            labels=label or None,
            cpu=cpu,
            memory_mb=memory_mb,
            pids=pids,
            disk_mb=disk_mb,
            ttl_seconds=ttl,
        )
    if as_json:
        output.print_json(forked)
    else:
        click.echo(forked.id)


# --- snapshots ---------------------------------------------------------------------------------


@main.group()
def snapshot() -> None:
    """A running sandbox's files, to start sandboxes from: create, list, inspect, delete."""


@snapshot.command("create")
@click.argument("ref", metavar="SANDBOX")
@click.option("--name", help="Unique name, usable wherever its id is.")
@click.option(
    "--expires-in", type=click.IntRange(min=1), metavar="SECONDS", help="Remove it after."
)
@click.option("-l", "--label", multiple=True, callback=parse_pairs, metavar="K=V", help="Label.")
@json_option
@pass_connection
def snapshot_create(
    connection: Connection,
    ref: str,
    name: str | None,
    expires_in: int | None,
    label: dict[str, str],
    as_json: bool,
) -> None:
    """Snapshot a running sandbox and print the snapshot's id."""
    with connection.client() as client:
        made = client.create_snapshot(ref, name=name, expires_in=expires_in, labels=label or None)
    if as_json:
        output.print_json(made)
    else:
        click.echo(made.id)


@snapshot.command("ls")
@click.option("--sandbox", metavar="ID", help="Only the snapshots of this sandbox.")
@click.option("--limit", type=click.IntRange(min=1), help="Show at most this many.")
@json_option
@pass_connection
def snapshot_ls(
    connection: Connection, sandbox: str | None, limit: int | None, as_json: bool
) -> None:
    """List snapshots with their source, node, size and the sandboxes started from them."""
    with connection.client() as client:
        snapshots = client.list_snapshots(sandbox=sandbox, limit=limit)
    if as_json:
        output.print_json(snapshots)
    else:
        output.print_table(output.snapshot_table(snapshots))


@snapshot.command("inspect")
@click.argument("ref", metavar="NAME|ID")
@pass_connection
def snapshot_inspect(connection: Connection, ref: str) -> None:
    """A snapshot as JSON."""
    with connection.client() as client:
        output.print_json(client.get_snapshot(ref))


@snapshot.command("rm")
@click.argument("refs", metavar="NAME|ID...", nargs=-1, required=True)
@pass_connection
def snapshot_rm(connection: Connection, refs: tuple[str, ...]) -> None:
    """Delete snapshots (refused while a sandbox started from one is not deleted)."""
    with connection.client() as client:
        for ref in refs:
            client.delete_snapshot(ref)
            click.echo(ref)


# --- volumes -----------------------------------------------------------------------------------


@main.group()
def volume() -> None:
    """Named file systems that outlive sandboxes: create, list, inspect, delete."""


@volume.command("create")
@click.argument("name")
@click.option("--size-mb", type=click.IntRange(min=3), help="Its size, and limit [default: 1024].")
@click.option("--node", metavar="ID", help="Keep it on this node [default: least loaded].")
@click.option("-l", "--label", multiple=True, callback=parse_pairs, metavar="K=V", help="Label.")
@json_option
@pass_connection
def volume_create(
    connection: Connection,
    name: str,
    size_mb: int | None,
    node: str | None,
    label: dict[str, str],
    as_json: bool,
) -> None:
    """Create a volume and print its id."""
    with connection.client() as client:
        made = client.create_volume(name, size_mb=size_mb, node=node, labels=label or None)
    if as_json:
        output.print_json(made)
    else:
        click.echo(made.id)


@volume.command("ls")
@json_option
@pass_connection
def volume_ls(connection: Connection, as_json: bool) -> None:
    """List volumes with their node, size and the sandboxes that mount them."""
    with connection.client() as client:
        volumes = client.list_volumes()
    if as_json:
        output.print_json(volumes)
    else:
        output.print_table(output.volume_table(volumes))


@volume.command("inspect")
@click.argument("ref", metavar="NAME|ID")
@pass_connection
def volume_inspect(connection: Connection, ref: str) -> None:
    """A volume as JSON."""
    with connection.client() as client:
        output.print_json(client.get_volume(ref))


@volume.command("rm")
@click.argument("refs", metavar="NAME|ID...", nargs=-1, required=True)
@pass_connection
def volume_rm(connection: Connection, refs: tuple[str, ...]) -> None:
    """Delete volumes and their data (refused while a sandbox mounts one)."""
    with connection.client() as client:
        for ref in refs:
            client.delete_volume(ref)
            click.echo(ref)


# --- images ------------------------------------------------------------------------------------


@main.group()
def image() -> None:
    """Container images on the nodes: pull, import, list, inspect, remove."""


@image.command("pull")
@click.argument("reference", metavar="HOST[:PORT]/NAME[:TAG|@DIGEST]")
@click.option("--username", "-u", help="For a registry that wants credentials.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password (or access token) from stdin."
)
@click.option("--node", metavar="ID", help="Pull on this node [default: least loaded].")
@json_option
@pass_connection
def image_pull(
    connection: Connection,
    reference: str,
    username: str | None,
    password_stdin: bool,
    node: str | None,
    as_json: bool,
) -> None:
    """Pull an image onto a node and print its id. The password comes from stdin or
    CORRAL_REGISTRY_PASSWORD, never from the command line."""
    password = None
    if password_stdin:
        password = click.get_text_stream("stdin").read().rstrip("\r\n")
    elif username is not None:
        password = os.environ.get("CORRAL_REGISTRY_PASSWORD")
    if username is not None and password is None:
        raise click.UsageError("--username needs --password-stdin or CORRAL_REGISTRY_PASSWORD")
    if password is not None and username is None:
        raise click.UsageError("a password needs --username")
    with connection.client() as client:
        pulled = client.pull_image(reference, username=username, password=password, node=node)
    if as_json:
        output.print_json(pulled)
    else:
        click.echo(pulled.id)


@image.command("import")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.option("--reference", "-r", metavar="NAME", help="Name it [default: the archive's own].")
@click.option("--node", metavar="ID", help="Import on this node [default: least loaded].")
@json_option
@pass_connection
def image_import(
    connection: Connection, archive: str, reference: str | None, node: str | None, as_json: bool
) -> None:
    """Import an OCI layout tarball or a `docker save` tarball and print its id."""
    with connection.client() as client:
        imported = client.import_image(archive, reference=reference, node=node)
    if as_json:
        output.print_json(imported)
    else:
        click.echo(imported.id)


@image.command("ls")
@click.option("--node", metavar="ID", help="Only this node's.")
@json_option
@pass_connection
def image_ls(connection: Connection, node: str | None, as_json: bool) -> None:
    """List images with their node, size and the sandboxes that run on them."""
    with connection.client() as client:
        images = client.list_images(node=node)
    if as_json:
        output.print_json(images)
    else:
        output.print_table(output.image_table(images))


@image.command("inspect")
@click.argument("ref", metavar="REF|ID")
@click.option("--node", metavar="ID", help="This node's.")
@pass_connection
def image_inspect(connection: Connection, ref: str, node: str | None) -> None:
    """An image as JSON."""
    with connection.client() as client:
        output.print_json(client.get_image(ref, node=node))


@image.command("rm")
@click.argument("refs", metavar="REF|ID...", nargs=-1, required=True)
@click.option("--node", metavar="ID", help="Only from this node [default: every node].")
@pass_connection
def image_rm(connection: Connection, refs: tuple[str, ...], node: str | None) -> None:
    """Remove images (refused while a sandbox runs on one)."""
    with connection.client() as client:
        for ref in refs:
            client.delete_image(ref, node=node)
            click.echo(ref)


# --- tokens ------------------------------------------------------------------------------------


@main.group()
def token() -> None:
    """Create, list and revoke API tokens (needs the admin scope)."""


@token.command("new")
@click.option("--name", default="", help="What the token is for.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice([scope.value for scope in Scope]),
    help="Grant this scope (repeatable) [server default: read, exec, files].",
)
@click.option(
    "--sandbox", "sandboxes", multiple=True, metavar="REF", help="Limit to this sandbox (repeat)."
)
@click.option("--expires-in", type=click.IntRange(min=1), metavar="SECONDS", help="Lifetime.")
@json_option
@pass_connection
def token_new(
    connection: Connection,
    name: str,
    scopes: tuple[str, ...],
    sandboxes: tuple[str, ...],
    expires_in: int | None,
    as_json: bool,
) -> None:
    """Create a token and print its secret, which is shown this once only."""
    with connection.client() as client:
        created = client.create_token(
            name=name,
            scopes=scopes or None,
            sandbox_ids=sandboxes or None,
            expires_in_seconds=expires_in,
        )
    if as_json:
        output.print_json(created)
        return
    # The secret alone on stdout, so that `$(corral token new)` captures just it.
    scope_list = ", ".join(scope.value for scope in created.scopes)
    click.echo(f"Created token {created.id} ({scope_list}). Its secret, shown once:", err=True)
    click.echo(created.secret)


@token.command("ls")
@json_option
@pass_connection
def token_ls(connection: Connection, as_json: bool) -> None:
    """List tokens (never their secrets)."""
    with connection.client() as client:
        tokens = client.list_tokens()
    if as_json:
        output.print_json(tokens)
    else:
        output.print_table(output.token_table(tokens))


@token.command("rm")
@click.argument("token_ids", nargs=-1, required=True, metavar="ID...")
@pass_connection
def token_rm(connection: Connection, token_ids: tuple[str, ...]) -> None:
    """Revoke tokens at once; prints each revoked id."""
    failed = False
    with connection.client() as client:
        for token_id in token_ids:
            try:
                client.delete_token(token_id)
                click.echo(token_id)
            except CorralError as exc:
                click.echo(output.error_line(exc), err=True)
                failed = True
    if failed:
        raise click.exceptions.Exit(EXIT_API_ERROR)


# --- audit log ---------------------------------------------------------------------------------


@main.command("audit")
@click.option("--token", metavar="ID", help="Calls made with this token id (admin: the key).")
@click.option("--action", help="This action, or a prefix ending in * (e.g. 'sandbox.*').")
@click.option("--target", "--sandbox", "target", metavar="ID", help="Calls about this id.")
@click.option("--result", type=click.Choice(["ok", "error"]), help="Only these outcomes.")
@click.option("--since", metavar="TIME", help="From this ISO 8601 time on.")
@click.option("--until", metavar="TIME", help="Before this ISO 8601 time.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
@pass_connection
def audit(
    connection: Connection,
    token: str | None,
    action: str | None,
    target: str | None,
    result: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """State-changing calls, newest first: who, what, on what, the outcome, when, from where
    (needs the admin key or the audit scope)."""
    with connection.client() as client:
        entries = client.list_audit(
            token=token,
            action=action,
            target=target,
            result=result,
            since=since,
            until=until,
            limit=limit,
        )
    if as_json:
        output.print_json(entries)
    else:
        output.print_table(output.audit_table(entries))


main.add_command(__import__("corral.cli.named", fromlist=["user"]).user)  # cmd.io: users, commands
main.add_command(__import__("corral.cli.webhooks", fromlist=["webhooks"]).webhooks)

# --- live output, terminals, files and code runs (corral.cli.live) -----------------------------

for _command in live.COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":
    main(prog_name="corral")
