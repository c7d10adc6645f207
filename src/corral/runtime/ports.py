"""TCP connections to a port of a sandbox, opened inside the sandbox's own network namespace.

A sandbox's services listen on its own loopback, which nothing outside its network namespace can
reach (a sandbox with `"network": "none"` has nothing else). The node makes the socket inside
that namespace: a short-lived thread of its own joins the namespace (setns, which moves only the
calling thread), creates the socket, and ends; a socket keeps the namespace it was made in for
life, so the event loop connects and uses it like any other.

What the sandbox cannot change:
- the address: always 127.0.0.1 of the sandbox's namespace, whatever the sandbox says or names
  (no host name is resolved, no address comes from the caller);
- the namespace: the descriptor of its namespace is opened when the sandbox is created, by the
  node, from the pid bwrap reports before the sandbox runs anything, and held while it runs; a
  recycled pid can never stand in for it;
- the thread: it is never one of a pool's (a pooled thread left in a sandbox's namespace would
  resolve names and open connections for the server there), and it ends right after.
Packets of such a socket stay on the sandbox's loopback: the host's own interfaces and its
filter rules are not involved.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import threading

CLONE_NEWNET = 0x40000000
CONNECT_TIMEOUT = 5.0

_libc = ctypes.CDLL(None, use_errno=True)


class PortRefused(ConnectionError):
    """Nothing listens on the port (or the sandbox's namespace refused the connection)."""


def open_netns(pid: int) -> int:
    """A descriptor of the network namespace process `pid` is in (close-on-exec)."""
    return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _socket_in(netns_fd: int) -> socket.socket:
    """A TCP socket made inside the namespace `netns_fd` (runs on a thread of its own, which
    owns the descriptor and closes it)."""
    try:
        if _libc.setns(netns_fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns: {os.strerror(code)}")
    finally:
        os.close(netns_fd)
    # No way back is needed: this thread ends once the socket exists.
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)


async def socket_in(netns_fd: int) -> socket.socket:
    """A TCP socket made inside the namespace `netns_fd`.

    The thread works on a duplicate made here, before anything awaits: the sandbox's own
    descriptor may be closed (the sandbox stopped) and its number reused for another sandbox's
    namespace while the thread starts, and the socket must never land there."""
    netns_fd = os.dup(netns_fd)
    loop = asyncio.get_running_loop()
    made: asyncio.Future[socket.socket] = loop.create_future()

    def settle(sock: socket.socket | None, exc: BaseException | None) -> None:
        if made.cancelled():
            if sock is not None:
                sock.close()
        elif exc is not None:
            made.set_exception(exc)
        else:
            made.set_result(sock)  # type: ignore[arg-type]

    def work() -> None:
        try:
            sock = _socket_in(netns_fd)
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, sock, None)

    try:
        threading.Thread(target=work, name="corral-port-socket", daemon=True).start()
    except BaseException:
        os.close(netns_fd)
        raise
    return await made


async def connect(netns_fd: int, port: int) -> socket.socket:
    """A connected, non-blocking socket to 127.0.0.1:`port` of the namespace `netns_fd`.

    PortRefused when nothing listens there (a loopback refusal is immediate); TimeoutError when
    the connection is not made within CONNECT_TIMEOUT (a frozen or overloaded sandbox)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    sock = await socket_in(netns_fd)  # duplicates the descriptor before it first awaits
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), CONNECT_TIMEOUT)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ENETUNREACH):
            raise PortRefused(f"nothing listens on port {port} in the sandbox") from None
        raise
    except BaseException:
        sock.close()
        raise
    return sock
