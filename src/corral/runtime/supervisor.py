"""The supervisor that lives inside each sandbox and starts its commands.

Runs with the distribution's python3 (stdlib only), started by bwrap as uid 1000 with the
capabilities the node grants it. The node talks to it over a SOCK_SEQPACKET socket (fd given as
argv[1]): one JSON object per message, file descriptors for the command's stdio and cgroups
passed alongside with SCM_RIGHTS. The command's output goes straight from its pipes to the node;
the supervisor only reports start and exit. It trusts nothing it receives beyond the node's
messages and sends only its own.

The sandbox's root (sudo) owns the sandbox's /etc and /usr/local, so nothing there may decide
the code this file runs (loader.py): it starts through glibc's loader with --inhibit-cache (no
/etc/ld.so.cache of the sandbox's making), /etc/ld.so.preload is an empty read-only mount, and
python runs with -I -S (no PYTHON* variables, site, .pth files or sitecustomize); sys.path is
/usr/lib/python3.X only. The launcher is a fork of it, never an exec. It imports nothing beyond
the standard library.

The node, for its part, trusts none of this (frames.py): it reads these events within a budget
per sandbox, checks each against the list below, and stops the sandbox of a supervisor that
sends anything else (more than 4096 bytes, not JSON, an event about a command it was not asked
to run, a flood). Keep every event small and listed here.

Two processes do the work:
  - the supervisor switches to uid 0 of the sandbox's user namespace (still an unprivileged host
    uid), so that ordinary commands, which run as uid 1000, cannot signal it (`kill -9 -1`). It
    talks to the node, starts sudo, terminal and rlimit commands with fork + Python in the
    child, reaps, and restarts the launcher whenever it dies.
  - the launcher, forked once, is uid 1000 with every capability set (bounding set included)
    empty, not dumpable and RLIMIT_CORE 0, i.e. exactly what an ordinary command must be. So an
    ordinary command needs no Python in its child: the launcher moves itself into the command's
    cgroups, vfork+execs it through _posixsubprocess (setsid, dup2, close, signals, chdir in C)
    and moves itself back. The child is in the command's cgroups from its first instruction.
    Commands can kill or stop the launcher (same uid): the supervisor, a child subreaper,
    adopts the launcher's commands, fails the spawns it was in the middle of, and starts a new
    one; it sends SIGCONT to a stopped one.

Node -> supervisor:
  {"op": "spawn", "id", "argv", "env", "cwd", "tty", "rlimits", "user" ("root" for sudo),
   "joins": J, "homes": H}
      + fds [stdin, stdout, stderr, J cgroup.procs to join, H cgroup.procs of the sandbox];
      "cgroup" names its cgroup2 directory (how a command whose launcher died is found);
      with tty all three are the terminal
  {"op": "signal", "id", "sig"}                 signal the command's process group
Supervisor -> node:
  {"ev": "ready"}
  {"ev": "started", "id", "pid"}
  {"ev": "spawn_failed", "id", "error", "errno"}
  {"ev": "exit", "id", "code", "signal"}
"""

# Every sandbox has two processes of this file (the supervisor and its launcher): what it
# imports is paid in each sandbox's memory and start time. So the C modules where the Python
# ones add only conveniences: _signal and _socket without signal.py's and socket.py's enums,
# _json without the json package, which imports re, select.epoll without selectors and byte
# strings for descriptors without array, which import collections (together ~1.4 MiB of heap
# per process and several ms at start).
import _json
import _signal as signal
import _socket as socket
import ctypes
import errno
import fcntl
import gc
import mmap
import os
import resource
import select
import sys
import termios
import warnings  # noqa: F401 - os.execvpe/get_exec_path import it lazily; here it costs nothing

try:
    import _posixsubprocess
except ImportError:  # pragma: no cover - every CPython on Linux has it
    _posixsubprocess = None

MAX_MESSAGE = 1 << 20
# A spawn the launcher gets in one message over its socketpair, whose buffer an unprivileged
# process cannot raise past net.core.wmem_max (~208 KiB); larger ones (huge env or argv) fork.
# The launcher's events (started, exit, spawn_failed with an errno's text) are far smaller and
# are read in a buffer of this size too, which comes from the heap, not a mapping of its own.
LAUNCHER_MAX_MESSAGE = 64 << 10
LAUNCHER_DRAIN_SECONDS = 1.0
MAX_FDS = 16
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
USER_ID = 1000  # who ordinary commands run as: the sandbox user, or an image's User
GROUP_ID = 1000
MAPPED = ((0, 1008), (65520, 15))  # the uids of the sandbox's user namespace (runtime/uids.py)
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded once, not in every forked child
# The fork_exec signature the launcher calls (CPython 3.11 to 3.13); other versions use fork.
LAUNCHER_PYTHONS = ((3, 11), (3, 12), (3, 13))
CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DEFAULTED = (*CAUGHT, signal.SIGPIPE, signal.SIGCHLD, signal.SIGXFSZ)


def _no_ptrace() -> None:
    # Commands run as uid 1000 (and sudo ones as uid 0): stop them attaching to us. Also needed
    # after every uid change, which resets the flag.
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def _ignore(_signum, _frame) -> None:
    pass


def _become_user(uid=None, gid=None, groups=()) -> None:
    """The sandbox user (or another of the sandbox's users), with only its own groups and every
    capability set empty, the bounding set included: an ordinary command keeps none of the
    supervisor's and can never regain them (a setuid-root file made by sudo gives it nothing).
    Raises OSError if any of it did not hold."""
    libc = LIBC
    uid = USER_ID if uid is None else uid
    gid = GROUP_ID if gid is None else gid
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last capability: fine
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}, all zero
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1:
            raise OSError(1, "the bounding set could not be emptied")


class _Scanning:
    """What _json's scanner reads off its context (json.JSONDecoder's defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name):
        raise ValueError(f"not JSON: {name}")


_scan = _json.make_scanner(_Scanning())
_encode = _json.make_encoder(
    None, None, _json.encode_basestring_ascii, None, ":", ",", False, False, True
)
_SPACE = " \t\n\r"


def dumps(value):
    """json.dumps(value, separators=(",", ":")) for the plain data of this protocol."""
    return "".join(_encode(value, 0))


def loads(data):
    """json.loads of one message (bytes or str); ValueError if it is not exactly one value."""
    text = data.decode() if isinstance(data, (bytes, bytearray)) else data
    start = len(text) - len(text.lstrip(_SPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"not JSON at {exc.value}") from None
    if text[end:].strip(_SPACE):
        raise ValueError(f"extra data at {end}")
    return value


def _send(sock, message):
    sock.send(dumps(message).encode())


INT = 4  # bytes of a C int: a descriptor in SCM_RIGHTS


# Where messages are received, made at the first one. recvmsg(MAX_MESSAGE) had the allocator
# map, shrink and unmap 1 MiB for every message (~25 us each, four per command); this private
# mapping takes pages only as messages touch them, and a forked launcher copies those on write.
_BUFFER = None


def _recv(sock):
    global _BUFFER
    if _BUFFER is None:
        _BUFFER = mmap.mmap(-1, MAX_MESSAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fds = []
    size, ancdata, _flags, _addr = sock.recvmsg_into([_BUFFER], socket.CMSG_SPACE(MAX_FDS * INT))
    data = _BUFFER[:size]
    if size > LAUNCHER_MAX_MESSAGE:
        _BUFFER.madvise(mmap.MADV_DONTNEED)  # a rare large one: its pages go back
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % INT
            fds += [
                int.from_bytes(payload[i : i + INT], sys.byteorder, signed=True)
                for i in range(0, whole, INT)
            ]
    return data, fds


def _fd_bytes(fds):
    return b"".join(fd.to_bytes(INT, sys.byteorder, signed=True) for fd in fds)


class _Poller:
    """The little of selectors.DefaultSelector used here, on select.epoll: readable
    descriptors, each with its data; `select` returns the data of those ready."""

    def __init__(self):
        self.epoll = select.epoll()
        self.data = {}

    def register(self, fileobj, data):
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        self.epoll.register(fd, select.EPOLLIN)
        self.data[fd] = data

    def unregister(self, fileobj):
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        self.data.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except OSError:  # closed since (as selectors allows)
            pass

    def select(self, timeout=-1):
        return [self.data[fd] for fd, _events in self.epoll.poll(timeout) if fd in self.data]


def _exit_event(cid, info, **extra):
    if info.si_code == os.CLD_EXITED:
        return {"ev": "exit", "id": cid, "code": info.si_status, "signal": None, **extra}
    return {"ev": "exit", "id": cid, "code": None, "signal": info.si_status, **extra}


def _read_to_end(fd):
    """What a child's error pipe holds once the child has exec'd or failed (EOF)."""
    report = b""
    while chunk := os.read(fd, 50000):
        report += chunk
    return report


def _fork_spawn(message, fds):
    """Fork and exec the command with Python in the child (sudo, terminals, rlimits); returns
    its pid. Raises OSError with the child's errno."""
    stdin, stdout, stderr = fds[0], fds[1], fds[2]
    cgroups = fds[3 : 3 + int(message.get("joins", len(fds) - 3))]
    argv = [str(a) for a in message["argv"]]
    env = {str(k): str(v) for k, v in message["env"].items()}
    cwd = str(message["cwd"])
    errpipe_r, errpipe_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child
        try:
            signal.set_wakeup_fd(-1)
            for sig in DEFAULTED:
                signal.signal(sig, signal.SIG_DFL)
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
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            if message.get("user") == "root":
                # sudo: uid 0 of the sandbox's user namespace, mapped to an unprivileged host
                # uid; it keeps only the capabilities the supervisor holds.
                os.setgroups([])
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
            elif "uid" in message:  # another user of the sandbox's, resolved by _handle
                _become_user(int(message["uid"]), int(message["gid"]), message["groups"])
            else:
                _become_user()
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
        report = _read_to_end(errpipe_r)
    finally:
        os.close(errpipe_r)
    if report:
        os.waitpid(pid, 0)
        errno_text, _, text = report.decode(errors="replace").partition(":")
        raise OSError(int(errno_text or 0), text)
    return pid


# --- the launcher ----------------------------------------------------------------------------


def _fork_exec(argv, executables, cwd, env_list, stdin, stdout, stderr, errpipe_r, errpipe_w):
    # vfork (no uid/gid change, no preexec_fn), close every fd but the error pipe, restore
    # SIGPIPE/SIGXFSZ, reset caught handlers, setsid, chdir, execve over the executables: in C.
    return _posixsubprocess.fork_exec(
        argv, executables, True, (errpipe_w,), cwd, env_list,
        stdin, -1, -1, stdout, -1, stderr, errpipe_r, errpipe_w,
        True, True, -1, None, None, None, -1, None, True,
    )  # fmt: skip


def _exec_one(argv, executables, cwd, env_list, stdin, stdout, stderr):
    """Start a command; returns (pid, None) or (None, (errno, text))."""
    errpipe_r, errpipe_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            pid = _fork_exec(
                argv, executables, cwd, env_list, stdin, stdout, stderr, errpipe_r, errpipe_w
            )
        finally:
            os.close(errpipe_w)
        report = _read_to_end(errpipe_r)
    finally:
        os.close(errpipe_r)
    if not report:
        return pid, None
    os.waitpid(pid, 0)
    _name, _, rest = report.partition(b":")
    hex_errno, _, _msg = rest.partition(b":")
    try:
        errno = int(hex_errno, 16)
    except ValueError:
        errno = 0
    return None, (errno, os.strerror(errno) if errno else report.decode(errors="replace"))


def _launch(message, fds):
    """One ordinary command: join its cgroups, vfork+exec, go home. Returns (event, pid);
    raises SystemExit when the launcher could not get back out of the command's cgroups."""
    cid = message.get("id")
    joins, homes = int(message["joins"]), int(message["homes"])
    stdin, stdout, stderr = fds[0], fds[1], fds[2]
    join_fds = fds[3 : 3 + joins]
    home_fds = fds[3 + joins : 3 + joins + homes]
    try:
        argv = [os.fsencode(str(a)) for a in message["argv"]]
        env = {str(k): str(v) for k, v in message["env"].items()}
        env_list = []
        for key, value in env.items():
            if "=" in key:
                raise ValueError("illegal environment variable name")
            env_list.append(os.fsencode(key) + b"=" + os.fsencode(value))
        if any(b"\0" in item for item in (*argv, *env_list)):
            raise ValueError("embedded null byte")
        if os.path.dirname(argv[0]):
            executables = (argv[0],)
        else:
            executables = tuple(
                os.path.join(os.fsencode(d), argv[0]) for d in os.get_exec_path(env)
            )
        cwd = os.fsencode(str(message["cwd"]))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        return {"ev": "spawn_failed", "id": cid, "error": str(exc), "errno": 0}, None
    pid = failure = None
    stranded = False
    try:
        for fd in join_fds:
            os.write(fd, b"0")
        pid, failure = _exec_one(argv, executables, cwd, env_list, stdin, stdout, stderr)
    except OSError as exc:
        failure = (exc.errno, f"could not join the command's cgroups: {exc.strerror}")
    finally:
        try:
            for fd in home_fds:
                os.write(fd, b"0")
        except OSError:
            stranded = True
    if pid is None:
        event = {"ev": "spawn_failed", "id": cid, "error": failure[1], "errno": failure[0]}
    else:
        event = {"ev": "started", "id": cid, "pid": pid}
    if stranded:
        # Still inside a command's cgroups: it must not start anything else from there. The
        # supervisor adopts what was started and starts a new launcher.
        raise _Stranded(event)
    return event, pid


class _Stranded(Exception):
    pass


def _launcher_ready():
    """Whether fork_exec takes the arguments _fork_exec passes: one throwaway vfork whose exec
    must fail with ENOENT."""
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        pid, failure = _exec_one(
            [b"corral-probe"], (b"/nonexistent/corral-probe",), b"/", [], null, null, null
        )
    except (TypeError, ValueError, OSError):
        return False
    finally:
        os.close(null)
    if pid is not None:
        os.waitpid(pid, 0)
        return False
    return failure[0] == 2


def _launcher_main(chan_fd, node_fd):
    """The launcher process, forked from the supervisor; never returns. It answers the node
    directly (one hop less) and tells the supervisor the same, which keeps the state."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        low, high = sorted((chan_fd, node_fd))
        os.closerange(3, low)  # everything else of the supervisor's
        os.closerange(low + 1, high)
        os.closerange(high + 1, 65536)
        chan = socket.socket(fileno=chan_fd)
        chan.setblocking(True)
        node = socket.socket(fileno=node_fd)
        node.setblocking(True)

        def tell(event):
            data = dumps(event).encode()
            if event["ev"] == "started":
                # The supervisor first: once the node knows of a start it may ask for a
                # signal, and the supervisor must be able to find the command by then.
                chan.send(data)
                node.send(data)
            else:
                node.send(data)
                chan.send(data)

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # every command's default
        _become_user()
        _no_ptrace()
        if not _launcher_ready():
            _send(chan, {"ev": "launcher_unusable"})
            os._exit(0)
        _send(chan, {"ev": "launcher_ready"})
        selector = _Poller()
        selector.register(chan, None)
        while True:
            for ready in selector.select():
                if ready is None:
                    data, fds = _recv(chan)
                    if not data:
                        os._exit(0)  # the supervisor is gone
                    try:
                        event, pid = _launch(loads(data), fds)
                    except _Stranded as exc:
                        tell(exc.args[0])
                        os._exit(3)
                    finally:
                        for fd in fds:
                            os.close(fd)
                    tell(event)
                    if pid is not None:
                        pidfd = os.pidfd_open(pid)
                        selector.register(pidfd, (pid, pidfd, event["id"]))
                else:
                    pid, pidfd, cid = ready
                    selector.unregister(pidfd)
                    os.close(pidfd)
                    # Report before reaping: if this process dies in between, the supervisor
                    # reaps the adopted zombie and reports it instead.
                    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
                    tell(_exit_event(cid, info, pid=pid))
                    os.waitpid(pid, 0)
    except BaseException:  # the supervisor notices and starts another
        code = 2
    os._exit(code)


# --- the supervisor --------------------------------------------------------------------------


class Supervisor:
    def __init__(self, sock):
        self.sock = sock
        self.selector = _Poller()
        self.children = {}  # pid -> command id, reaped here (forked here, or adopted)
        self.launched = {}  # pid -> command id, started and reaped by the launcher
        self.groups = {}  # command id -> pid (its process group)
        self.pending = {}  # command id -> its cgroup's name: handed to the launcher, no answer
        self.launcher_pid = None
        self.launcher_chan = None
        self.launcher_up = False
        self.launcher_usable = (
            _posixsubprocess is not None and sys.version_info[:2] in LAUNCHER_PYTHONS
        )
        self.root = False
        # An image whose User is root: every command is a sudo one (the launcher, which runs
        # as the ordinary user, is not used).
        self.everyone_root = False
        # In a sandbox from an image: HOME, USER and LOGNAME of its root and of its user, from
        # its passwd, for commands whose environment does not set them.
        self.identity = None

    def setup(self):
        try:
            # Out of reach of `kill -1` from ordinary commands (uid 1000).
            os.setresuid(0, 0, 0)
            self.root = True
        except OSError:
            pass
        _no_ptrace()
        LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # adopt the launcher's orphans
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        for sig in CAUGHT:
            # Caught, not ignored: exec resets a caught signal, an ignored one stays ignored.
            signal.signal(sig, _ignore)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, _ignore)
        self.wake_r = wake_r
        self.selector.register(self.sock, "node")
        self.selector.register(wake_r, "wake")
        self._start_launcher()

    def run(self):
        self.setup()
        _send(self.sock, {"ev": "ready"})
        while True:
            # The launcher's copies of its events are read when a node message or a child's
            # exit needs them (a wake-up apiece would take the CPU from the launcher as it
            # tells the node), and at least every LAUNCHER_DRAIN_SECONDS.
            ready_now = self.selector.select(LAUNCHER_DRAIN_SECONDS)
            if not ready_now:
                self._drain_launcher()
            for ready in ready_now:
                if ready == "node":
                    try:
                        data, fds = _recv(self.sock)
                    except ConnectionError:
                        return
                    if not data:
                        return  # the node closed the socket: the sandbox is being stopped
                    try:
                        self._drain_launcher()  # the state as the launcher left it
                        self._handle(data, fds)
                    finally:
                        for fd in fds:
                            os.close(fd)
                elif ready == "wake":
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    self._reap()

    # launcher lifecycle

    def _start_launcher(self):
        if not self.launcher_usable or self.everyone_root:
            return
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Out of the collector's reach first: the launcher shares this process's heap
        # copy-on-write, and a collection that walked it would copy every page it touched.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            _launcher_main(theirs.fileno(), self.sock.fileno())
        theirs.close()
        self.launcher_pid = pid
        self.launcher_chan = mine
        self.launcher_up = False
        mine.settimeout(2.0)  # a stopped launcher must not hang the supervisor
        # Wait for it (a millisecond or two), so that the next command already uses it.
        try:
            first = mine.recv(LAUNCHER_MAX_MESSAGE)
        except OSError:  # stopped by a command meanwhile: try again at the next spawn
            self._launcher_gone(restart=False)
            return
        if first == b'{"ev":"launcher_ready"}':
            self.launcher_up = True
            return
        self.launcher_usable = False  # it could not drop its privileges, or vfork is missing
        self._launcher_gone(restart=False)

    def _launcher_gone(self, restart=True):
        chan = self.launcher_chan
        if chan is None:
            return
        chan.setblocking(False)
        try:
            while True:
                data = chan.recv(LAUNCHER_MAX_MESSAGE)
                if not data:
                    break
                self._launcher_event(loads(data))
        except (BlockingIOError, ConnectionError, ValueError):
            pass
        chan.close()
        self.launcher_chan = None
        self.launcher_up = False
        pid, self.launcher_pid = self.launcher_pid, None
        if pid is not None:  # wedged (or stranded) rather than dead: make sure
            self._kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        for pid, cid in self.launched.items():
            # The launcher tells us before the node: if it died in between, the node has not
            # heard of this start (it ignores a repeat).
            _send(self.sock, {"ev": "started", "id": cid, "pid": pid})
        self.children.update(self.launched)  # reparented to us: we are a subreaper
        self.launched.clear()
        self._reap()
        if self.pending:
            # Killed between exec and its answer (a command's `kill -9 -1` can be that
            # quick): the command runs, now as our child, in its own cgroup.
            me = os.getpid()
            try:
                with open(f"/proc/{me}/task/{me}/children") as f:
                    pids = [int(p) for p in f.read().split()]
            except OSError:
                pids = []
            for pid in pids:
                if pid not in self.children:
                    cid = self._ghost(pid)
                    if cid is not None:
                        self._adopt(cid, pid)
        for cid in list(self.pending):
            # Not started (or not found): the node also kills the command's cgroup.
            _send(self.sock, {"ev": "spawn_failed", "id": cid, "errno": 0,
                              "error": "the sandbox's command launcher was killed while "
                                       "starting the command"})  # fmt: skip
        self.pending.clear()
        if restart:
            self._start_launcher()

    def _from_launcher(self):
        """Take one event from the launcher if one is there; False if none was (or it is
        gone). Its descriptor is non-blocking (the socket has a timeout); the socket object
        would wait up to that timeout before reading, so the read goes around it."""
        chan = self.launcher_chan
        if chan is None:
            return False
        try:
            data = os.read(chan.fileno(), LAUNCHER_MAX_MESSAGE)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._launcher_gone()
            return False
        self._launcher_event(loads(data))
        return True

    def _launcher_event(self, event):
        """What the launcher tells the node too: a start just after us (if it dies in between,
        _launcher_gone repeats it), anything else just before. The node ignores repeats."""
        ev = event.get("ev")
        cid = event.get("id")
        if ev == "started":
            self.pending.pop(cid, None)
            self.launched[int(event["pid"])] = cid
            self.groups[cid] = int(event["pid"])
        elif ev == "spawn_failed":
            self.pending.pop(cid, None)
        elif ev == "exit" and self.launched.pop(int(event["pid"]), None) is not None:
            self.groups.pop(cid, None)

    def _ghost(self, pid):
        """The pending command whose cgroup holds `pid`, if any."""
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("0::/"):
                name = line[4:]
                for cid, cgroup in self.pending.items():
                    if cgroup and cgroup == name:
                        return cid
        return None

    def _adopt(self, cid, pid):
        del self.pending[cid]
        self.children[pid] = cid
        self.groups[cid] = pid
        _send(self.sock, {"ev": "started", "id": cid, "pid": pid})

    def _reap(self):
        self._drain_launcher()  # what it started, before its orphans are looked at
        flags = os.WEXITED | os.WSTOPPED | os.WNOHANG
        while True:
            try:
                # Look before reaping: an unknown child's cgroup tells whether it is a command
                # whose launcher died before answering.
                info = os.waitid(os.P_ALL, 0, flags | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            if info.si_code in (os.CLD_STOPPED, os.CLD_TRAPPED):
                os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG)
                if pid == self.launcher_pid:
                    # Stopped by a command (same uid): same session, so SIGCONT is allowed.
                    self._kill(pid, signal.SIGCONT)
                continue
            if pid == self.launcher_pid:
                os.waitpid(pid, 0)
                self.launcher_pid = None
                self._launcher_gone()
                continue
            cid = self.children.pop(pid, None)
            if cid is None:
                cid = self.launched.pop(pid, None)  # adopted before its launcher's EOF
            if cid is None and self.pending:
                cid = self._ghost(pid)
                if cid is not None:
                    self._adopt(cid, pid)
                    del self.children[pid]
            os.waitpid(pid, 0)
            if cid is None:
                continue  # an orphan left by a command, or reported already
            self.groups.pop(cid, None)
            _send(self.sock, _exit_event(cid, info))

    # node messages

    def _handle(self, data, fds):
        message = loads(data)
        op = message.get("op")
        cid = message.get("id")
        if op == "spawn":
            if len(fds) < 3:
                _send(self.sock, {"ev": "spawn_failed", "id": cid, "error": "missing descriptors"})
                return
            user = message.get("user")
            if self.everyone_root and user in (None, "user"):
                message["user"] = user = "root"
            if user not in (None, "user", "root"):
                try:
                    named = _named_user(str(user))
                except ValueError as exc:
                    _send(self.sock, {"ev": "spawn_failed", "id": cid, "error": str(exc)})
                    return
                if named is None:
                    message["user"] = "root"  # a name for uid 0
                else:
                    message["uid"], message["gid"], message["groups"] = named
                if isinstance(message.get("env"), dict):
                    for key, value in _identity(0 if named is None else named[0]).items():
                        message["env"].setdefault(key, value)
                data = dumps(message).encode()
            elif self.identity is not None and isinstance(message.get("env"), dict):
                who = self.identity["root" if message.get("user") == "root" else "user"]
                for key, value in who.items():
                    message["env"].setdefault(key, value)
                data = dumps(message).encode()
            if self._forward(message, data, fds):
                return
            try:
                pid = _fork_spawn(message, fds)
            except OSError as exc:
                error = exc.strerror or str(exc)
                _send(self.sock, {"ev": "spawn_failed", "id": cid, "error": error,
                                  "errno": exc.errno})  # fmt: skip
                return
            self.children[pid] = cid
            self.groups[cid] = pid
            _send(self.sock, {"ev": "started", "id": cid, "pid": pid})
        elif op == "signal":
            if cid not in self.groups and cid in self.pending:
                self._drain_launcher()  # its "started" may be waiting on the channel
            pgid = self.groups.get(cid)
            if pgid is not None:
                self._killpg(pgid, int(message["sig"]))

    def _drain_launcher(self):
        """Take the launcher's events already sent (it tells us before the node)."""
        while self._from_launcher():
            pass

    def _forward(self, message, data, fds):
        """Hand an ordinary command to the launcher; False if it must be forked here."""
        if self.launcher_chan is None and self.launcher_usable:
            self._start_launcher()
        if not (self.launcher_up and self.launcher_chan is not None):
            return False
        if message.get("tty") or message.get("user") not in (None, "user"):
            return False  # the launcher only ever is the sandbox user
        if any(str(k) != "core" or int(v) != 0 for k, v in (message.get("rlimits") or {}).items()):
            return False
        joins, homes = message.get("joins"), message.get("homes")
        if not isinstance(joins, int) or not isinstance(homes, int):
            return False
        if (joins and not homes) or len(fds) != 3 + joins + homes:
            return False  # the launcher could not get back out of the command's cgroups
        if len(data) > LAUNCHER_MAX_MESSAGE:
            return False  # more than the pair's buffer takes in one message: fork it here
        try:
            self.launcher_chan.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(fds))]
            )
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                return False  # not sent: the launcher is fine
            self._launcher_gone()
            return False
        self.pending[message.get("id")] = str(message.get("cgroup") or "")
        return True

    def _killpg(self, pgid, sig):
        self._kill(-pgid, sig)

    def _kill(self, pid, sig):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            if not self.root:
                return
            # A uid 1000 process: signal it as uid 1000 (we hold no CAP_KILL).
            os.setresuid(-1, USER_ID, -1)
            try:
                os.kill(pid, sig)
            except OSError:
                pass
            finally:
                os.setresuid(-1, 0, -1)
                _no_ptrace()


def _lookup(path, name):
    """The numeric fields of `name`'s line in a passwd or group file, read as text: libc's
    lookups would load NSS modules from the sandbox's root."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 3 and fields[0] == name:
                    return fields
    except OSError:
        pass
    return None


def resolve_user(spec):
    """(uid, gid) of an image's User ("name", "uid", "name:group", "uid:gid"); uid 0 is root."""
    user, _, group = spec.partition(":")
    entry = None
    if user.isdigit():
        uid = int(user)
        gid = uid
    else:
        entry = _lookup("/etc/passwd", user)
        if entry is None or len(entry) < 4 or not entry[2].isdigit() or not entry[3].isdigit():
            raise ValueError(f"user {user!r} is not in the sandbox's /etc/passwd")
        uid, gid = int(entry[2]), int(entry[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = _lookup("/etc/group", group)
            if found is None or not found[2].isdigit():
                raise ValueError(f"group {group!r} is not in the sandbox's /etc/group")
            gid = int(found[2])
    for ident in (uid, gid):
        if not any(first <= ident < first + count for first, count in MAPPED):
            raise ValueError(f"uid or gid {ident} is outside the sandbox's uids")
    return uid, gid


def _named_user(name):
    """(uid, gid, supplementary gids) of a user of the sandbox's own /etc/passwd, or None for
    one whose uid is 0. Raises ValueError for a user it does not have, or whose ids the sandbox
    does not map."""
    uid, gid = resolve_user(name)
    if uid == 0:
        return None
    groups = []
    try:
        with open("/etc/group", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 4 and fields[2].isdigit() and name in fields[3].split(","):
                    ident = int(fields[2])
                    if any(first <= ident < first + count for first, count in MAPPED):
                        groups.append(ident)
    except OSError:
        pass
    return uid, gid, sorted(set(groups) | {gid})


def _identity(uid):
    name, home = ("root", "/root") if uid == 0 else (str(uid), "/")
    try:
        with open("/etc/passwd", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and fields[2] == str(uid):
                    name, home = fields[0], fields[5] or home
                    break
    except OSError:
        pass
    return {"HOME": home, "USER": name, "LOGNAME": name}


def _hand_over_workspace():
    """A new, empty /workspace (made for uid 1000) belongs to the image's user."""
    try:
        st = os.lstat("/workspace")
        if st.st_uid != USER_ID and st.st_uid == 1000 and not os.listdir("/workspace"):
            os.chown("/workspace", USER_ID, GROUP_ID)
    except OSError:
        pass


def main() -> None:
    """argv: [--user=SPEC] FD. With --user (a sandbox whose root is its own), SPEC is who
    ordinary commands run as ("root": every command is root's), and HOME, USER and LOGNAME
    come from its passwd; without it, uid 1000 and the node's environment."""
    global USER_ID, GROUP_ID
    args = sys.argv[1:]
    user = None
    if args and args[0].startswith("--user="):
        user = args.pop(0).removeprefix("--user=")
    sock = socket.socket(fileno=int(args[0]))
    sock.setblocking(True)
    supervisor = Supervisor(sock)
    if user is not None:
        if user in ("", "root"):
            supervisor.everyone_root = True
        else:
            try:
                USER_ID, GROUP_ID = resolve_user(user)
            except ValueError as exc:
                sys.stderr.write(f"{exc}\n")  # the node reports it as why it did not start
                raise SystemExit(2) from None
            if USER_ID == 0:
                supervisor.everyone_root = True
            else:
                _hand_over_workspace()
        supervisor.identity = {"root": _identity(0), "user": _identity(USER_ID)}
    supervisor.run()


if __name__ == "__main__":
    main()
