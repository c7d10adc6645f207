"""CLI commands for live output, terminals, files and code runs: `attach`, `shell`, `cp`, `run`,
and what `exec --stream` prints with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from corral.client import AsyncClient, Client, CorralError, NotFoundError
from corral.core.models import (
    CommandStatus,
    ErrorEvent,
    ExitEvent,
    OutputEvent,
    RunResult,
)

# The same exit statuses as `corral exec` (see corral.cli.main).
EXIT_API_ERROR = 1
EXIT_TIMED_OUT = 124
EXIT_NOT_RUN = 125
EXIT_CANCELLED = 130
SHELL_TIMEOUT_MS = 8 * 3600 * 1000
INPUT_QUEUE = 64  # pieces of terminal input waiting to be sent
LANGUAGES = ("typescript", "javascript", "python", "bash")
EXTENSIONS = {
    ".ts": "typescript",
    ".mts": "typescript",
    ".tsx": "typescript",
    ".js": "javascript",
    ".mjs": "javascript",
    ".py": "python",
    ".sh": "bash",
    ".bash": "bash",
}


def terminal_status(event: ExitEvent | ErrorEvent | None) -> int:
    """The exit status `corral` gives for a stream's terminal event."""
    if not isinstance(event, ExitEvent):
        return EXIT_NOT_RUN
    if event.status is CommandStatus.completed:
        if event.exit_code is not None:
            return event.exit_code
        if event.signal is not None:
            return 128 + event.signal
        return EXIT_NOT_RUN
    if event.status is CommandStatus.timed_out:
        return EXIT_TIMED_OUT
    if event.status is CommandStatus.cancelled:
        return EXIT_CANCELLED
    return EXIT_NOT_RUN


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            import select

            select.select([], [fd], [])


def _note(text: str) -> None:
    click.echo(f"corral: {text}", err=True)


def print_events(events: Iterable[Any]) -> ExitEvent | ErrorEvent | None:
    """Copy output events to our stdout and stderr as they come; the terminal event."""
    out, err = sys.stdout.fileno(), sys.stderr.fileno()
    sys.stdout.flush()
    result = None
    for event in events:
        if isinstance(event, OutputEvent):
            _write(out if event.type == "stdout" else err, event.bytes)
        elif isinstance(event, ExitEvent | ErrorEvent):
            result = event
    describe_end(result)
    return result


def describe_end(result: ExitEvent | ErrorEvent | None) -> None:
    if isinstance(result, ErrorEvent):
        _note(f"error: {result.code}: {result.message}")
    elif isinstance(result, ExitEvent):
        if result.status is CommandStatus.timed_out:
            _note("command timed out")
        elif result.status is CommandStatus.cancelled:
            _note("command was cancelled")
        elif result.status is CommandStatus.failed:
            _note(f"error: command failed to start: {result.error or 'no reason given'}")
        for stream in ("stdout", "stderr"):
            if getattr(result, f"{stream}_truncated"):
                total = getattr(result, f"{stream}_bytes")
                _note(f"{stream} truncated (the command wrote {total} bytes)")


def follow_and_exit(sandbox: str, stream: Any) -> None:
    """Print a stream's output; on Ctrl-C detach and say how to re-attach."""
    try:
        result = print_events(stream)
    except KeyboardInterrupt:
        stream.close()
        _note(
            f"detached; the command runs on. Re-attach: corral attach {sandbox} "
            f"{stream.command_id} --offset {stream.offset}"
        )
        raise click.exceptions.Exit(EXIT_CANCELLED) from None
    raise click.exceptions.Exit(terminal_status(result))


# --- attach ------------------------------------------------------------------------------------


@click.command("attach")
@click.argument("sandbox_ref", metavar="SANDBOX")
@click.argument("command_id", metavar="CMD_ID")
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Resume from this offset.")
@click.pass_obj
def attach(connection: Any, sandbox_ref: str, command_id: str, offset: int) -> None:
    """Print a command's output from the start (or --offset), then live until it ends.

    Its exit status is the command's, as with `corral exec`. Ctrl-C detaches (the command runs
    on) and prints the offset to resume from.
    """
    with connection.client() as client:
        stream = client.stream_logs(sandbox_ref, command_id, offset=offset)
        stream.command_id = command_id
        follow_and_exit(sandbox_ref, stream)


# --- shell -------------------------------------------------------------------------------------


@click.command("shell", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_ref", metavar="SANDBOX")
@click.argument("command", nargs=-1, metavar="[-- CMD...]")
@click.option("-e", "--env", "env_pairs", multiple=True, metavar="K=V", help="Env var.")
@click.option("--cwd", help="Working directory (absolute) [default: /workspace].")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=SHELL_TIMEOUT_MS / 1000,
    show_default=True,
    metavar="SECONDS",
    help="End the session after this long.",
)
@click.pass_obj
def shell(
    connection: Any,
    sandbox_ref: str,
    command: tuple[str, ...],
    env_pairs: tuple[str, ...],
    cwd: str | None,
    timeout: float,
) -> None:
    """An interactive terminal in a sandbox: a login bash, or CMD.

    Line editing, job control, Ctrl-C and the window size all reach the sandbox. The session
    ends with the shell (its exit status is ours); closing the connection ends the shell.
    """
    env = {}
    for pair in env_pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--env")
        env[key] = value
    program, args = ("bash", ["-l"]) if not command else (command[0], list(command[1:]))
    status = asyncio.run(
        _shell(connection, sandbox_ref, program, args, env, cwd, round(timeout * 1000))
    )
    raise click.exceptions.Exit(status)


def _window_size() -> tuple[int, int]:
    for fd in (sys.stdout.fileno(), sys.stdin.fileno(), sys.stderr.fileno()):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return max(1, size.lines), max(1, size.columns)
    return 24, 80


async def _shell(
    connection: Any,
    sandbox: str,
    program: str,
    args: list[str],
    env: dict[str, str],
    cwd: str | None,
    timeout_ms: int,
) -> int:
    import termios
    import tty

    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    terminal = os.isatty(stdin_fd)
    rows, cols = _window_size()
    env = {"TERM": os.environ.get("TERM") or "xterm-256color", **env}
    async with AsyncClient(connection.url, token=connection.token) as client:
        try:
            session = await client.connect_exec(
                sandbox,
                program,
                args=args,
                cwd=cwd,
                env=env,
                tty=True,
                rows=rows,
                cols=cols,
                timeout_ms=timeout_ms,
                kill_on_disconnect=True,
            )
        except CorralError as exc:
            from corral.cli import _output

            click.echo(_output.error_line(exc), err=True)
            return EXIT_API_ERROR
        loop = asyncio.get_running_loop()
        # Keystrokes, window sizes and the end of input, to the sandbox in order.
        inputs: asyncio.Queue[bytes | tuple[int, int] | None] = asyncio.Queue()
        saved = termios.tcgetattr(stdin_fd) if terminal else None

        paused = False  # reading stdin waits while the sandbox catches up (back-pressure)
        ended = False

        def readable() -> None:
            nonlocal paused, ended
            try:
                data = os.read(stdin_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                ended = True
                loop.remove_reader(stdin_fd)
            inputs.put_nowait(data or None)
            if not ended and inputs.qsize() >= INPUT_QUEUE:
                paused = True
                loop.remove_reader(stdin_fd)

        async def send_input() -> None:
            nonlocal paused
            while True:
                item = await inputs.get()
                if paused and inputs.qsize() < INPUT_QUEUE // 4:
                    paused = False
                    loop.add_reader(stdin_fd, readable)
                if item is None:
                    await session.close_stdin()
                    return
                if isinstance(item, tuple):
                    await session.resize(*item)
                else:
                    await session.send_stdin(item)

        def resized() -> None:
            inputs.put_nowait(_window_size())

        main = asyncio.current_task()
        sender = asyncio.ensure_future(send_input())
        result = None
        try:
            if saved is not None:
                tty.setraw(stdin_fd, termios.TCSANOW)
            loop.add_reader(stdin_fd, readable)
            loop.add_signal_handler(signal.SIGWINCH, resized)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, lambda: main and main.cancel())
            async for event in session:
                if isinstance(event, OutputEvent):
                    _write(stdout_fd, event.bytes)
                elif isinstance(event, ExitEvent | ErrorEvent):
                    result = event
        except asyncio.CancelledError:
            pass
        except CorralError as exc:
            result = ErrorEvent(code="transport", message=str(exc))
        finally:
            with contextlib.suppress(Exception):
                loop.remove_reader(stdin_fd)
            for sig in (signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            if saved is not None:
                termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            with contextlib.suppress(Exception):
                await session.close()
        if isinstance(result, ErrorEvent):
            _note(f"error: {result.code}: {result.message}")
        return terminal_status(result)


# --- cp ----------------------------------------------------------------------------------------


def split_remote(arg: str) -> tuple[str, str] | None:
    """`SANDBOX:PATH` as (sandbox, path); None for a local path (`./a:b` stays local)."""
    head, sep, tail = arg.partition(":")
    if not sep or not head or "/" in head or arg.startswith((".", "/")):
        return None
    return head, tail or "/workspace"


def _remote_type(client: Client, sandbox: str, path: str) -> str | None:
    try:
        return client.stat_file(sandbox, path, follow=True).type
    except NotFoundError:
        return None


@click.command("cp")
@click.argument("source")
@click.argument("destination")
@click.option(
    "--level",
    type=click.IntRange(0, 9),
    default=1,
    show_default=True,
    help="gzip level for directories (0: store only).",
)
@click.pass_obj
def cp(connection: Any, source: str, destination: str, level: int) -> None:
    """Copy files and directories between here and a sandbox.

    \b
      corral cp ./dir  box:/workspace/dir     directory (as a tar.gz stream)
      corral cp file   box:/workspace/        file (into the directory)
      corral cp box:/workspace/out ./out      and back
      corral cp - box:/workspace/f < data     stdin to a file; `box:path -` to stdout

    As with `cp -r` and `docker cp`: a directory copied onto an existing directory goes inside
    it (end the source with `/.` to copy its contents instead).
    """
    src, dst = split_remote(source), split_remote(destination)
    if (src is None) == (dst is None):
        raise click.UsageError("exactly one of SOURCE and DESTINATION must be SANDBOX:PATH")
    with connection.client() as client:
        if dst is not None:
            _upload(client, source, *dst, level)
        else:
            assert src is not None
            _download(client, *src, destination, level)


def _upload(client: Client, source: str, sandbox: str, path: str, level: int) -> None:
    if source == "-":
        client.upload_file(sandbox, click.get_binary_stream("stdin"), path)
        return
    local = Path(source)
    if not local.exists():
        raise click.UsageError(f"{source}: no such file or directory")
    kind = _remote_type(client, sandbox, path)
    contents_only = source.endswith(("/.", "/./"))
    name = local.resolve().name
    if local.is_dir():
        target = posixpath.join(path, name) if kind == "directory" and not contents_only else path
        result = client.upload_dir(sandbox, local, target, level=level)
        _note(f"{result.entries} entries, {result.bytes} bytes -> {sandbox}:{result.path}")
    else:
        into = kind == "directory" or path.endswith("/")
        target = posixpath.join(path, name) if into else path
        client.upload_file(sandbox, local, target)


def _download(client: Client, sandbox: str, path: str, destination: str, level: int) -> None:
    kind = _remote_type(client, sandbox, path)
    if kind is None:
        raise click.ClickException(f"{sandbox}:{path}: no such file or directory")
    if destination == "-":
        out = click.get_binary_stream("stdout")
        if kind == "directory":
            client.download_archive(sandbox, path, out, level=level)
        else:
            client.download_file(sandbox, path, out)
        out.flush()
        return
    local = Path(destination)
    name = posixpath.basename(path.rstrip("/")) or "root"
    if kind == "directory":
        contents_only = path.endswith(("/.", "/./"))
        target = local / name if local.is_dir() and not contents_only else local
        count = client.download_dir(sandbox, path, target, level=level)
        _note(f"{count} entries -> {target}")
    else:
        target = local / name if local.is_dir() or destination.endswith("/") else local
        client.download_file(sandbox, path, target)


# --- run ---------------------------------------------------------------------------------------


@click.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox_ref", metavar="SANDBOX")
@click.argument("file", required=False, metavar="[FILE|-]")
@click.argument("args", nargs=-1, metavar="[-- ARGS...]")
@click.option("-l", "--language", type=click.Choice(LANGUAGES), help="[default: from FILE]")
@click.option("-c", "--code", help="The program text, instead of FILE.")
@click.option("--path", "remote_path", help="A program file in the sandbox, instead of FILE.")
@click.option("-e", "--env", "env_pairs", multiple=True, metavar="K=V", help="Env var.")
@click.option("--cwd", help="Working directory (absolute) [default: /workspace].")
@click.option("--stdin", "stdin_text", help="Standard input for the program.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Kill the program after this long [server default].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@click.pass_obj
def run(
    connection: Any,
    sandbox_ref: str,
    file: str | None,
    args: tuple[str, ...],
    language: str | None,
    code: str | None,
    remote_path: str | None,
    env_pairs: tuple[str, ...],
    cwd: str | None,
    stdin_text: str | None,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Run a TypeScript, JavaScript, Python or bash program in a sandbox.

    The program's output is copied to ours; the value it gives `result.set(...)` is printed
    last on stdout as JSON; `result.error(...)` or an uncaught error is printed on stderr. The
    exit status is the program's.

    \b
      corral run box script.ts -- arg1 arg2
      corral run box -l python -c 'result.set({"n": 6 * 7})'
    """
    if (code is not None) or (remote_path is not None):
        if file is not None:
            args = (file, *args)
            file = None
    if sum(x is not None for x in (file, code, remote_path)) != 1:
        raise click.UsageError("give exactly one of FILE, -c CODE and --path PATH")
    if file is not None:
        if file == "-":
            code = click.get_text_stream("stdin").read()
        else:
            try:
                code = Path(file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise click.UsageError(f"cannot read {file}: {exc}") from exc
        language = language or EXTENSIONS.get(Path(file).suffix.lower())
    elif remote_path is not None:
        language = language or EXTENSIONS.get(posixpath.splitext(remote_path)[1].lower())
    if language is None:
        raise click.UsageError("give --language (it cannot be told from a file name here)")
    env = {}
    for pair in env_pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--env")
        env[key] = value
    with connection.client() as client:
        result = client.run_code(
            sandbox_ref,
            code,
            language=language,
            path=remote_path,
            args=list(args),
            env=env or None,
            cwd=cwd,
            stdin=stdin_text,
            timeout_ms=None if timeout is None else max(1, round(timeout * 1000)),
        )
    if as_json:
        click.echo(result.model_dump_json(indent=2))
    else:
        _report_run(result)
    raise click.exceptions.Exit(_run_status(result))


def _report_run(result: RunResult) -> None:
    out, err = sys.stdout.fileno(), sys.stderr.fileno()
    sys.stdout.flush()
    _write(out, result.stdout.encode("utf-8", "surrogateescape"))
    _write(err, result.stderr.encode("utf-8", "surrogateescape"))
    if result.result is not None:
        prefix = "\n" if result.stdout and not result.stdout.endswith("\n") else ""
        _write(out, (prefix + json.dumps(result.result) + "\n").encode())
    if result.error is not None:
        name = f"{result.error.name}: " if result.error.name else ""
        _note(f"error: {name}{result.error.message}")


def _run_status(result: RunResult) -> int:
    if result.status is CommandStatus.completed:
        if result.exit_code is not None:
            return result.exit_code
        return 128 + (result.signal or 0) if result.signal else EXIT_NOT_RUN
    if result.status is CommandStatus.timed_out:
        return EXIT_TIMED_OUT
    if result.status is CommandStatus.cancelled:
        return EXIT_CANCELLED
    return EXIT_NOT_RUN


COMMANDS = (attach, shell, cp, run)
