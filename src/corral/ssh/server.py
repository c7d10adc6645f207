"""The SSH front of the cmd.io face.

`ssh -p PORT TOKEN@host <command> [args]` runs a named command the token has access to, with no
key or password; `ssh -p PORT USER@host ...` signs a registered user in with one of their public
keys, and runs their own commands and the builtins:

    cmd-tokens new|ls|rm TOKEN       the user's cmd.io tokens
    <command>:access add|rm|ls TOKEN  who may run one of the user's commands

A command runs in a fresh sandbox, removed when it ends. Its stdout and stderr go to the SSH
client's, the client's input to its stdin, and its exit status (128+N when killed by signal N)
back to the client, which cmd.io itself did not do. When the client asks for a terminal
(`ssh -t`) the command runs on one, with window size changes passed on.

A session signed in with a token ends with it: once the token is revoked or expires, the client
gets `error: <reason>` on its stderr and exit status 129 (a hang-up), the channel and the
connection close, and the command runs on to its end, as when a client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from pathlib import Path
from typing import Any

import asyncssh

from corral.core.errors import CorralError, NotFound
from corral.core.named_commands import NamedCommandRow
from corral.core.token_watch import TokenEnded
from corral.core.tokens import Principal
from corral.node.output_log import STDOUT
from corral.services import Services

log = logging.getLogger(__name__)

TOKENS_USAGE = """Usage:
  ssh <user>@cmd.io cmd-tokens [command]

Available Commands:
  ls          List tokens
  new         Create a token
  rm          Delete a token

Additional help topics:

Use "[command] --help" for help about a meta command.
"""
ACCESS_USAGE = "Usage: <command>:access add|rm|ls [TOKEN]\n"
EXIT_USAGE = 2
EXIT_REFUSED = 1
EXIT_NOT_RUN = 125
EXIT_TOKEN_ENDED = 129  # 128 + SIGHUP: the session was hung up on


def host_key(services: Services) -> asyncssh.SSHKey:
    """The server's host key, made on first start and kept in the data dir."""
    settings = services.settings
    path = Path(settings.ssh_host_key or settings.data_dir / "ssh_host_key")
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(0o600)
        path.write_bytes(key.export_private_key())
        path.chmod(0o600)
        return key
    return asyncssh.read_private_key(str(path))


class Identity:
    """Who signed in: a registered user (by key) or a token (as the user name)."""

    def __init__(self) -> None:
        self.user: str | None = None
        self.principal: Principal | None = None


class CorralSSHServer(asyncssh.SSHServer):
    def __init__(self, services: Services) -> None:
        self.services = services
        self.identity = Identity()
        self._candidate_user: str | None = None

    async def begin_auth(self, username: str) -> bool:  # type: ignore[override]
        named = self.services.named
        if await named.find_user(username) is not None:
            self._candidate_user = username
            return True  # a user: their key is required
        try:
            self.identity.principal = await self.services.tokens.authenticate(username)
        except CorralError:
            return True  # neither: every method will fail
        return False  # a token: signed in with no key

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:  # type: ignore[override]
        if self._candidate_user != username:
            return False
        if await self.services.named.key_allowed(username, key):
            self.identity.user = username
            return True
        return False


async def start_ssh_server(services: Services) -> asyncssh.SSHAcceptor:
    settings = services.settings
    assert settings.ssh_port is not None
    key = host_key(services)

    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        connection = process.get_extra_info("connection")
        identity = connection.get_owner().identity
        session = Session(services, identity, process)
        principal = identity.principal
        hang_up = False
        try:
            if principal is None:  # a user signed in by key: no token to end with
                status = await session.run()
            else:
                with services.tokens.lease(principal) as lease:
                    status = await lease.run(session.run())
        except TokenEnded as ended:
            status, hang_up = EXIT_TOKEN_ENDED, True
            with contextlib.suppress(Exception):
                session.err(f"error: {ended.message}\n")
        except Exception:
            log.exception("ssh session failed")
            status = EXIT_NOT_RUN
            with contextlib.suppress(Exception):
                process.stderr.write(b"internal error\n")
        with contextlib.suppress(Exception):
            process.exit(status)
        if hang_up:  # the connection was signed in with that token: no more channels on it
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.channel.wait_closed(), 2)
            connection.close()

    return await asyncssh.create_server(
        lambda: CorralSSHServer(services),
        settings.host,
        settings.ssh_port,
        server_host_keys=[key],
        process_factory=handle,
        encoding=None,
        line_editor=False,
        allow_scp=False,
        agent_forwarding=False,
        x11_forwarding=False,
        login_timeout=30,
    )


class Session:
    def __init__(
        self,
        services: Services,
        identity: Identity,
        process: asyncssh.SSHServerProcess[bytes],
    ) -> None:
        self.services = services
        self.identity = identity
        self.process = process

    def out(self, text: str) -> None:
        self.process.stdout.write(
            text.replace("\n", "\r\n").encode() if self.tty else text.encode()
        )

    def err(self, text: str) -> None:
        self.process.stderr.write(
            text.replace("\n", "\r\n").encode() if self.tty else text.encode()
        )

    @property
    def tty(self) -> bool:
        return self.process.get_terminal_type() is not None

    async def run(self) -> int:
        line = self.process.command or ""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            self.err(f"cannot parse the command line: {exc}\n")
            return EXIT_USAGE
        if not words:
            return await self.usage()
        first, rest = words[0], words[1:]
        try:
            if first == "cmd-tokens":
                return await self.tokens(rest)
            if first.endswith(":access"):
                return await self.access(first.removesuffix(":access"), rest)
            return await self.named(first, rest)
        except NotFound as exc:
            self.err(f"{exc.message}\n")
            return EXIT_REFUSED
        except CorralError as exc:
            self.err(f"error: {exc.message}\n")
            return EXIT_REFUSED

    async def usage(self) -> int:
        named = self.services.named
        if self.identity.user is not None:
            commands = [c.name for c in await named.list_commands(self.identity.user)]
        elif self.identity.principal is not None:
            rows = await named.commands_for_token(self.identity.principal.token_id)
            commands = [f"{r.owner}/{r.name}" for r in rows]
        else:
            commands = []
        self.out("Usage: ssh <user>@<host> <command> [args...]\n\nCommands:\n")
        for name in commands:
            self.out(f"  {name}\n")
        if self.identity.user is not None:
            self.out("\nBuiltins:\n  cmd-tokens\n  <command>:access\n")
        return 0

    def _need_user(self) -> str | None:
        if self.identity.user is None:
            self.err("builtins need a user signed in with their key, not a token\n")
        return self.identity.user

    async def tokens(self, args: list[str]) -> int:
        user = self._need_user()
        if user is None:
            return EXIT_REFUSED
        named = self.services.named
        sub = args[0] if args else None
        if sub == "new" and len(args) == 1:
            created = await named.new_token(user)
            self.out(f"Token created: {created.secret}\n")
            return 0
        if sub == "ls" and len(args) == 1:
            for token in await named.list_tokens(user):
                self.out(f"{token.id}  {token.prefix}...  {token.created_at:%Y-%m-%d %H:%M}\n")
            return 0
        if sub == "rm" and len(args) == 2:
            await named.remove_token(user, args[1])
            self.out("Token deleted.\n")
            return 0
        (self.out if sub in (None, "--help", "-h", "help") else self.err)(TOKENS_USAGE)
        return 0 if sub in (None, "--help", "-h", "help") else EXIT_USAGE

    async def access(self, name: str, args: list[str]) -> int:
        user = self._need_user()
        if user is None:
            return EXIT_REFUSED
        named = self.services.named
        sub = args[0] if args else None
        if sub == "add" and len(args) == 2:
            await named.grant(user, name, args[1])
            self.out("Access granted.\n")
            return 0
        if sub == "rm" and len(args) == 2:
            await named.revoke(user, name, args[1])
            self.out("Access revoked.\n")
            return 0
        if sub == "ls" and len(args) == 1:
            for entry in await named.access_list(user, name):
                self.out(f"{entry.token_id}  {entry.prefix}...\n")
            return 0
        self.err(ACCESS_USAGE)
        return EXIT_USAGE

    async def resolve(self, ref: str) -> NamedCommandRow | None:
        named = self.services.named
        owner, _, name = ref.rpartition("/")
        if self.identity.user is not None:
            if owner and owner != self.identity.user:
                return None
            return await named.command_row(self.identity.user, name)
        principal = self.identity.principal
        if principal is None:
            return None
        if principal.is_admin and owner:
            return await named.command_row(owner, name)
        matches = [
            r
            for r in await named.commands_for_token(principal.token_id)
            if r.name == name and (not owner or r.owner == owner)
        ]
        return matches[0] if len(matches) == 1 else None

    async def named(self, ref: str, args: list[str]) -> int:
        command = await self.resolve(ref)
        if command is None:
            self.err("unauthorized token\n" if self.identity.user is None else "not found\n")
            return EXIT_REFUSED
        width, height, _, _ = self.process.get_terminal_size()
        tty = self.tty
        async with self.services.named.run(
            command,
            args,
            source="ssh",
            interactive=True,
            tty=tty,
            rows=height or 24,
            cols=width or 80,
        ) as run:
            execution = run.execution
            if execution is None:
                self.err(f"error: {run.row.error or 'the command could not start'}\n")
                return EXIT_NOT_RUN
            feeder = asyncio.ensure_future(self._feed(execution))
            try:
                async for chunk in self.services.commands.follow_output(run.sandbox.id, run.row.id):
                    if chunk is None:
                        continue
                    target = self.process.stdout if chunk.stream == STDOUT else self.process.stderr
                    target.write(chunk.data)
                    await target.drain()
                await self.services.commands.wait_finished(run.row.id)
                result = await self.services.commands.get(
                    run.sandbox.id, run.row.id, output=(b"", b"")
                )
            finally:
                feeder.cancel()
        if result.exit_code is not None:
            return result.exit_code
        if result.signal is not None:
            return 128 + result.signal
        self.err(f"error: {result.error or result.status.value}\n")
        return EXIT_NOT_RUN

    async def _feed(self, execution: Any) -> None:
        """The client's input to the command's, until EOF."""
        stdin = self.process.stdin
        while True:
            try:
                data = await stdin.read(65536)
            except asyncssh.TerminalSizeChanged as change:
                await execution.resize(change.height or 24, change.width or 80)
                continue
            except asyncssh.SignalReceived as sig:
                number = getattr(__import__("signal"), f"SIG{sig.signal}", None)
                if number is not None:
                    await execution.signal(int(number))
                continue
            except asyncssh.BreakReceived:
                continue
            except (asyncssh.Error, OSError, asyncio.IncompleteReadError):
                data = b""
            if not data:
                with contextlib.suppress(Exception):
                    await execution.close_stdin()
                return
            try:
                await execution.write_stdin(data)
            except (BrokenPipeError, OSError):
                return
