"""The supervisor that lives inside each sandbox and starts its commands.

Runs under the sandbox's own uid with the distribution's python3 (`python3 -I -S`, stdlib only).
The node talks to it over a SOCK_SEQPACKET socket (fd given as argv[1]): one JSON object per
message, file descriptors for the command's stdio and cgroup passed alongside with SCM_RIGHTS.
The command's output goes straight from its pipes to the node; the supervisor only reports
start and exit. It trusts nothing it receives beyond the node's messages and sends only its own.

Node -> supervisor:
  {"op": "spawn", "id", "argv", "env", "cwd", "tty", "rlimits", "user" ("root" for sudo)}
      + fds [stdin, stdout, stderr, cgroup.procs...]; with tty all three are the terminal
  {"op": "signal", "id", "sig"}                 signal the command's process group
Supervisor -> node:
  {"ev": "ready"}
  {"ev": "started", "id", "pid"}
  {"ev": "spawn_failed", "id", "error"}
  {"ev": "exit", "id", "code", "signal"}
"""

import array
import ctypes
import fcntl
import json
import os
import resource
import selectors
import signal
import socket
import sys
import termios
import warnings  # noqa: F401 - os.execvpe imports it lazily; here it costs nothing per command

MAX_MESSAGE = 1 << 20
PR_SET_DUMPABLE = 4


def _no_ptrace() -> None:
    # Commands run as the same uid: stop them from attaching to the supervisor.
    try:
        LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except OSError:
        pass


USER_ID = 1000
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded once, not in every forked child
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_CAPBSET_DROP = 24


def _drop_capabilities() -> None:
    """Empty every capability set, the bounding set included: an ordinary command keeps none of
    the supervisor's and can never regain them."""
    libc = LIBC
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last capability: fine
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}, all zero
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _send(sock, message):
    sock.send(json.dumps(message, separators=(",", ":")).encode())


def _recv(sock):
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(16 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return data, list(fds)


def _spawn(message, fds):
    """Fork and exec the command; returns its pid. Raises OSError with the child's errno."""
    stdin, stdout, stderr = fds[0], fds[1], fds[2]
    cgroups = fds[3:8]
    argv = [str(a) for a in message["argv"]]
    env = {str(k): str(v) for k, v in message["env"].items()}
    cwd = str(message["cwd"])
    errpipe_r, errpipe_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child
        try:
            for cgroup in cgroups:
                # Join the command's cgroups before anything can fork: the node kills the
                # whole tree, and measures it, through them.
                os.write(cgroup, b"0")
            os.setsid()
            if message.get("tty"):
                fcntl.ioctl(stdin, termios.TIOCSCTTY, 0)  # the terminal becomes ours
            os.dup2(stdin, 0)
            os.dup2(stdout, 1)
            os.dup2(stderr, 2)
            os.closerange(3, errpipe_w)
            os.closerange(errpipe_w + 1, 65536)
            for sig in (signal.SIGPIPE, signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            if message.get("user") == "root":
                # sudo: uid 0 of the sandbox's user namespace, mapped to an unprivileged host
                # uid; it keeps only the capabilities the supervisor holds.
                os.setgroups([])
                os.setgid(0)
                os.setuid(0)
            else:
                os.setgroups([])
                os.setgid(USER_ID)
                _drop_capabilities()
            for name, value in (message.get("rlimits") or {}).items():
                limit = getattr(resource, "RLIMIT_" + str(name).upper())
                resource.setrlimit(limit, (int(value), int(value)))
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            os.write(errpipe_w, f"{exc.errno}:{exc.strerror}".encode())
        except BaseException as exc:
            os.write(errpipe_w, f"0:{exc}".encode())
        os._exit(127)
    os.close(errpipe_w)
    try:
        report = b""
        while True:
            chunk = os.read(errpipe_r, 1024)
            if not chunk:
                break
            report += chunk
    finally:
        os.close(errpipe_r)
    if report:
        os.waitpid(pid, 0)
        errno_text, _, text = report.decode(errors="replace").partition(":")
        raise OSError(int(errno_text or 0), text)
    return pid


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.setblocking(True)
    _no_ptrace()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)

    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, None)
    running = {}  # pid -> command id
    groups = {}  # command id -> pid (its process group)
    _send(sock, {"ev": "ready"})

    while True:
        for key, _ in selector.select():
            if key.data is None:
                try:
                    data, fds = _recv(sock)
                except ConnectionError:
                    return
                if not data:
                    return  # the node closed the socket: the sandbox is being stopped
                try:
                    _handle(sock, selector, running, groups, json.loads(data), fds)
                finally:
                    for fd in fds:
                        os.close(fd)
            else:
                pid, pidfd = key.data
                selector.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                cid = running.pop(pid)
                groups.pop(cid, None)
                if os.WIFSIGNALED(status):
                    _send(
                        sock, {"ev": "exit", "id": cid, "code": None, "signal": os.WTERMSIG(status)}
                    )
                else:
                    _send(
                        sock,
                        {"ev": "exit", "id": cid, "code": os.WEXITSTATUS(status), "signal": None},
                    )


def _handle(sock, selector, running, groups, message, fds):
    op = message.get("op")
    cid = message.get("id")
    if op == "spawn":
        if len(fds) < 3:
            _send(sock, {"ev": "spawn_failed", "id": cid, "error": "missing descriptors"})
            return
        try:
            pid = _spawn(message, fds)
        except OSError as exc:
            _send(
                sock,
                {
                    "ev": "spawn_failed",
                    "id": cid,
                    "error": exc.strerror or str(exc),
                    "errno": exc.errno,
                },
            )
            return
        pidfd = os.pidfd_open(pid)
        selector.register(pidfd, selectors.EVENT_READ, (pid, pidfd))
        running[pid] = cid
        groups[cid] = pid
        _send(sock, {"ev": "started", "id": cid, "pid": pid})
    elif op == "signal":
        pgid = groups.get(cid)
        if pgid is not None:
            try:
                os.killpg(pgid, int(message["sig"]))
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
