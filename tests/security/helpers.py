"""Shared helpers for the security tests: sandboxes through the native API, and an in-sandbox
probe runner that executes many small probes in one exec while keeping each result separate."""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from corral.runtime.rootfs import RootLayout
from tests.conftest import UID_BLOCK, Server, make_data_dir

# Runs inside the sandbox as the command itself (python3 -c RUNNER, stdin = JSON request).
# Each Python probe runs in a forked child (a crash, a signal or a wild clone stays its own),
# each shell probe in its own bash. Prints {probe id: outcome} as JSON.
RUNNER = r"""
import json, os, select, signal, subprocess, sys, time
import resource, stat
# The descriptors this command was started with, found without opening any.
START_FDS, START_KINDS = [], {}
for _fd in range(min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1 << 16)):
    try:
        _mode = os.fstat(_fd).st_mode
    except OSError:
        continue
    START_FDS.append(_fd)
    START_KINDS[_fd] = ("fifo" if stat.S_ISFIFO(_mode) else "socket" if stat.S_ISSOCK(_mode)
                        else "chr" if stat.S_ISCHR(_mode) else "other")
req = json.loads(sys.stdin.read())
CTX = dict(req["ctx"], start_fds=START_FDS, start_kinds=START_KINDS, runner_pid=os.getpid())
out = {}
for p in req["probes"]:
    pid_ = p["id"]
    limit = p.get("timeout", 10)
    if p.get("sh") is not None:
        try:
            cp = subprocess.run(["bash", "-c", p["sh"]], capture_output=True, timeout=limit,
                                stdin=subprocess.DEVNULL, start_new_session=True)
            out[pid_] = {"value": {"rc": cp.returncode,
                                   "out": cp.stdout.decode(errors="replace")[-4000:],
                                   "err": cp.stderr.decode(errors="replace")[-2000:]}}
        except subprocess.TimeoutExpired:
            out[pid_] = {"timeout": limit}
        continue
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        try:
            g = {"CTX": CTX, "__name__": "probe"}
            exec(req["prelude"], g)
            exec(p["py"], g)
            data = {"value": g.get("result")}
        except BaseException as exc:
            data = {"error": "%s: %s" % (type(exc).__name__, exc)}
        blob = json.dumps(data, default=repr).encode()
        while blob:
            blob = blob[os.write(w, blob):]
        os._exit(0)
    os.close(w)
    chunks, deadline, killed = [], time.monotonic() + limit, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            os.kill(child, signal.SIGKILL)
            killed = True
            break
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        out[pid_] = {"signal": os.WTERMSIG(status), "timeout": limit if killed else None}
    else:
        try:
            out[pid_] = json.loads(b"".join(chunks))
        except ValueError:
            out[pid_] = {"error": "no result (exit status %d)" % status}
print(json.dumps(out))
"""

# Helpers every Python probe gets: raw syscalls returning the result or the errno's name, the
# i386 `int 0x80` entry, and a few syscall numbers.
PRELUDE = r"""
import ctypes, errno, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]

def _arg(a):
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    if isinstance(a, int):
        return ctypes.c_long(a if a < 1 << 63 else a - (1 << 64))
    return a  # a ctypes object (buffer)

def sc(nr, *args):
    '''syscall(nr, *args): the return value, or the errno's name ("EPERM").'''
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    if ret == -1:
        e = ctypes.get_errno()
        return errno.errorcode.get(e, str(e))
    return ret

_low = None

def low_page():
    '''An RWX page below 4 GiB (MAP_32BIT): code for int 0x80 and 32-bit pointer args.'''
    global _low
    if _low is None:
        _low = libc.mmap(None, 8192, 7, 0x22 | 0x40, -1, 0)
    return _low

def low_data(blob):
    addr = low_page() + 4096
    ctypes.memmove(addr, blob, len(blob))
    return addr

def int80(nr, a=0, b=0, c=0, d=0):
    '''A syscall through the i386 entry (int 0x80) from this 64-bit process.'''
    code = b"\x53\x56\x57"  # push rbx, rsi, rdi
    for op, val in ((b"\xb8", nr), (b"\xbb", a), (b"\xb9", b), (b"\xba", c), (b"\xbe", d)):
        code += op + struct.pack("<I", val & 0xFFFFFFFF)
    code += b"\xcd\x80\x5f\x5e\x5b\xc3"  # int 0x80; pop rdi, rsi, rbx; ret
    page = low_page()
    ctypes.memmove(page, code, len(code))
    ret = ctypes.c_int(ctypes.CFUNCTYPE(ctypes.c_long)(page)()).value
    return ret if ret >= 0 else errno.errorcode.get(-ret, str(-ret))

def err(fn, *args):
    '''Call fn; None if it worked, else the errno's name.'''
    try:
        fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return None

# Its script as its command line names it: the compiled code, or the source.
SUPERVISOR_SCRIPTS = {b"/.corral/supervisor.pyc", b"/.corral/supervisor.py"}

def supervisor_pid():
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/cmdline" % name, "rb") as f:
                    argv = f.read().split(b"\0")
                if SUPERVISOR_SCRIPTS & set(argv) and not argv[0].endswith(b"bwrap"):
                    return int(name)
            except OSError:
                pass
    return None
"""


@contextmanager
def dedicated_server(prefix: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """A server of its own, with a block of host uids no other test process picks (test servers
    elsewhere count up from 300000), so that host-side checks see exactly its sandboxes. `env`
    adds settings (CORRAL_*)."""
    data_dir = make_data_dir(prefix)
    srv = Server(data_dir, env=env)
    srv.uid_base = random.randrange(3_000_000_000, 4_000_000_000, UID_BLOCK)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)  # copes with any depth


def sandbox_dir(data_dir: Path, sid: str) -> Path:
    """A sandbox's directory on the host: <data dir>/sandboxes/<id>."""
    return data_dir / "sandboxes" / sid


def disk_dir(data_dir: Path, sid: str) -> Path:
    """Where a sandbox with a disk (the default: CORRAL_DEFAULT_DISK_MB, or its disk_mb) has its
    writable directories on the host: its ext4 image (disk.img beside it) is mounted there, and
    holds tmp/ and the writable layers of its root, /usr and /workspace (root_layout)."""
    return sandbox_dir(data_dir, sid) / "disk"


def root_layout(data_dir: Path, sid: str) -> RootLayout:
    """A sandbox's copy-on-write root on the host, as the runtime lays it out: its writable
    layers (`upper` for /, `usr_upper`, `workspace_upper`) are on its disk when it has one,
    else in <id>/cow."""
    directory = sandbox_dir(data_dir, sid)
    has_disk = (directory / "disk.img").exists()
    return RootLayout(directory, directory / ("disk" if has_disk else "cow"))


def create_sandbox(api: httpx.Client, **spec: Any) -> str:
    resp = api.post("/v1/sandboxes", json=spec)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def delete_sandbox(api: httpx.Client, sid: str) -> httpx.Response:
    return api.delete(f"/v1/sandboxes/{sid}")


@contextmanager
def sandbox(api: httpx.Client, **spec: Any) -> Iterator[str]:
    sid = create_sandbox(api, **spec)
    try:
        yield sid
    finally:
        delete_sandbox(api, sid)


def exec_(api: httpx.Client, sid: str, command: str, **extra: Any) -> dict[str, Any]:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command, **extra})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def start(api: httpx.Client, sid: str, command: str, **extra: Any) -> str:
    resp = api.post(f"/v1/sandboxes/{sid}/commands", json={"command": command, **extra})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def run_probes(
    api: httpx.Client,
    sid: str,
    probes: list[dict[str, Any]],
    ctx: dict[str, Any],
    timeout_ms: int = 60_000,
    prelude: str = "",
    user: str | None = None,
) -> dict[str, Any]:
    """Run probes ({"id", "py" | "sh", "timeout"?}) in one exec; returns {id: outcome}, each
    outcome {"value": ...} or {"error"|"signal"|"timeout": ...}. `prelude` adds helpers."""
    body = json.dumps({"ctx": ctx, "prelude": PRELUDE + prelude, "probes": probes})
    extra = {"user": user} if user else {}
    result = exec_(
        api,
        sid,
        "python3",
        args=["-I", "-S", "-c", RUNNER],
        stdin=body,
        timeout_ms=timeout_ms,
        **extra,
    )
    assert result["exit_code"] == 0, result
    return dict(json.loads(result["stdout"]))


def wait_until(predicate: Any, seconds: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
