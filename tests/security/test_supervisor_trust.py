"""The supervisor is out of reach of the sandbox's root.

A `"user": "root"` command owns the sandbox's copy-on-write root: its /etc, /usr (and
/usr/local). Whatever it plants there (a preloaded library, a rebuilt loader cache pointing at
its own libz, .pth files, sitecustomize, code appended to the standard library in its /usr)
must not run in the supervisor or its launcher after the sandbox restarts: exit codes stay true
and the planted code leaves no mark of them. They run the host's Python from the read-only
bind of the host's /usr at /.corral/host/usr, and map nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from corral.runtime.loader import host_python
from corral.runtime.namespaces import HOST_MOUNT
from tests.conftest import Server

pytestmark = pytest.mark.sandbox

MARKS = "/workspace/.marks"
# The supervisor's script as its command line names it: the compiled code, or the source.
SUPERVISOR_SCRIPTS = {b"/.corral/supervisor.pyc", b"/.corral/supervisor.py"}

# A library whose constructor appends "<tag> <its process's command line>" to MARKS.
EVIL_C = r"""
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void corral_mark(void) {
    char line[4096] = TAG " ";
    size_t at = strlen(line);
    int fd = open("/proc/self/cmdline", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, line + at, sizeof line - at - 2);
        close(fd);
        for (ssize_t i = 0; i < n; i++) if (!line[at + i]) line[at + i] = ' ';
        if (n > 0) at += n;
    }
    line[at++] = '\n';
    int out = open("/workspace/.marks", O_WRONLY | O_APPEND | O_CREAT, 0666);
    if (out >= 0) { write(out, line, at); close(out); }
}
"""

# Python that appends "<tag> <command line>" to MARKS.
MARK_PY = (
    "import os; open('/workspace/.marks', 'a').write('{tag} ' + "
    "open('/proc/self/cmdline').read().replace(chr(0), ' ') + chr(10))"
)

SITE = "/usr/local/lib/python3.11/dist-packages"
# In the sandbox's own copy of the standard library: a module the supervisor imports (os and
# the rest of what every Python imports first are frozen into the interpreter).
STDLIB_JSON = "/usr/lib/python3.11/json/__init__.py"
LIBZ = "/usr/lib/x86_64-linux-gnu/libz.so.1"

BUILD = f"""set -e
cd /workspace
touch .marks && chmod 666 .marks  # writable by every uid the marks come from
gcc -shared -fPIC -O2 -DTAG='"preload"' -o evil-preload.so evil.c
gcc -shared -fPIC -O2 -DTAG='"env"' -o evil-env.so evil.c
# A drop-in libz: its constructor runs, then every symbol is the real libz's (a DT_FILTER).
gcc -shared -fPIC -O2 -DTAG='"cache"' -Wl,-soname,libz.so.1 -Wl,--filter={LIBZ} \
    -o libz.so.1 evil.c
mkdir -p evilpy
printf '%s\\n' "{MARK_PY.format(tag="pythonpath")}" > evilpy/sitecustomize.py
"""

PLANT = f"""set -e
cd /workspace
mkdir -p /usr/local/lib
cp evil-preload.so evil-env.so libz.so.1 /usr/local/lib/
# The loader cache, rebuilt by the sandbox's root: libz.so.1 now resolves to /usr/local/lib.
ldconfig
mkdir -p {SITE}
printf '%s\\n' "{MARK_PY.format(tag="pth")}" > {SITE}/corral-evil.pth
printf '%s\\n' "{MARK_PY.format(tag="sitecustomize")}" > {SITE}/sitecustomize.py
printf '%s\\n' "{MARK_PY.format(tag="usercustomize")}" > {SITE}/usercustomize.py
# Debian's sitecustomize lives in /etc/python3.11, which the sandbox's root may replace.
rm -f /etc/python3.11 && mkdir -p /etc/python3.11
printf '%s\\n' "{MARK_PY.format(tag="etc-sitecustomize")}" > /etc/python3.11/sitecustomize.py
printf '%s\\n' "try:" "    {MARK_PY.format(tag="usr-stdlib")}" \
    "except OSError:" "    pass" >> {STDLIB_JSON}
# Data glibc reads by its own absolute paths (the locale, the gconv modules' cache): root's
# copies now, byte for byte the same.
for f in /usr/lib/locale/C.utf8/LC_CTYPE {os.path.dirname(LIBZ)}/gconv/gconv-modules.cache; do
    if [ -e "$f" ]; then printf '' >> "$f"; fi
done
# Last: from here on every dynamically linked program would load it, if the write held.
echo /usr/local/lib/evil-preload.so > /etc/ld.so.preload || true
"""


def run(api: httpx.Client, sid: str, command: str, **extra: object) -> dict:
    resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": command, **extra})
    assert resp.status_code == 200, resp.text
    return resp.json()


def trusted_processes(server: Server, sid: str) -> dict[int, str]:
    """Host pid -> /proc/PID/maps of the sandbox's supervisor and launcher."""
    found = {}
    for mount in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        procs = Path(mount) / server.cgroup_name / sid / "cgroup.procs"
        if procs.exists():
            for pid in procs.read_text().split():
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if SUPERVISOR_SCRIPTS & set(argv) and not argv[0].endswith(b"bwrap"):
                        found[int(pid)] = Path(f"/proc/{pid}/maps").read_text()
                except OSError:
                    continue
            break
    return found


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the planted code")
def test_what_sandbox_root_plants_never_runs_in_the_supervisor(
    server: Server, api: httpx.Client
) -> None:
    # Variables of the sandbox's spec reach its commands, never its supervisor.
    env = {"LD_PRELOAD": "/usr/local/lib/evil-env.so", "PYTHONPATH": "/workspace/evilpy"}
    resp = api.post("/v1/sandboxes", json={"env": env})
    assert resp.status_code == 201, resp.text
    sid = resp.json()["id"]
    try:
        assert run(api, sid, "cat > /workspace/evil.c", stdin=EVIL_C)["exit_code"] == 0
        built = run(api, sid, BUILD)
        assert built["exit_code"] == 0, built["stderr"]
        planted = run(api, sid, PLANT, user="root")
        assert planted["exit_code"] == 0, planted["stderr"]

        # Each planted piece works: ordinary python3 commands run them (one sitecustomize is
        # imported, the first on sys.path: PYTHONPATH's, else Debian's in /etc/python3.11).
        run(
            api, sid, "python3 -c pass; env -u PYTHONPATH python3 -c pass; python3 -c 'import json'"
        )
        marks = run(api, sid, f"cat {MARKS}")["stdout"]
        for tag in ("env", "cache", "pth", "pythonpath", "usercustomize", "etc-sitecustomize"):
            assert f"{tag} python3 -c pass" in marks, (tag, marks)
        assert "usr-stdlib python3 -c import json" in marks, marks
        assert "/usr/local/lib/libz.so.1" in run(api, sid, "ldconfig -p")["stdout"]
        # The one file no flag of the loader ignores is an empty read-only mount.
        preload = run(
            api, sid, "echo x > /etc/ld.so.preload; wc -c < /etc/ld.so.preload", user="root"
        )
        assert "Read-only file system" in preload["stderr"] and preload["stdout"] == "0\n", preload
        for change in (
            "rm -f /etc/ld.so.preload",
            "mv /etc/ld.so.preload /etc/old",
            "umount /etc/ld.so.preload",
            # The host's /usr the supervisor runs from is read-only to it.
            f"touch {HOST_MOUNT}/usr/bin/corral-planted",
            f"printf x >> {HOST_MOUNT}/usr/lib/python3.11/os.py",
            f"mount -o remount,rw {HOST_MOUNT}/usr",
        ):
            assert run(api, sid, change, user="root")["exit_code"] != 0, change

        assert run(api, sid, f": > {MARKS}")["exit_code"] == 0
        for step in ("stop", "start"):
            resp = api.post(f"/v1/sandboxes/{sid}/{step}")
            assert resp.status_code == 200, resp.text
        assert api.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"

        # The supervisor reports exits truly, through the launcher and the forked path alike.
        assert run(api, sid, "exit 7")["exit_code"] == 7
        assert run(api, sid, "exit 7", user="root")["exit_code"] == 7
        assert run(api, sid, "kill -9 $$")["exit_code"] == 137
        assert run(api, sid, "echo ok")["stdout"] == "ok\n"
        assert run(api, sid, "echo ok", tty=True)["exit_code"] == 0

        # Nothing planted ran in the supervisor or its launcher (their command line names
        # supervisor.py), nor is any of it mapped in them.
        marks = run(api, sid, f"cat {MARKS} 2>/dev/null; true")["stdout"]
        assert [line for line in marks.splitlines() if "supervisor.py" in line] == []
        trusted = trusted_processes(server, sid)
        assert len(trusted) == 2, trusted  # the supervisor and its launcher
        for pid, maps in trusted.items():
            mapped = {}  # path as the sandbox sees it -> (device, inode) from the maps
            for line in maps.splitlines():
                fields = line.split()
                if len(fields) >= 6 and fields[5].startswith("/"):
                    major, minor = (int(x, 16) for x in fields[3].split(":"))
                    mapped[fields[5]] = (os.makedev(major, minor), int(fields[4]))
            # Paths in the read-only bind of the host's /usr, and the host's very files there
            # (same device and inode), never a file of the sandbox's own root (its /usr
            # included: what glibc opens by its own paths, locale and gconv files, too).
            outside = [f for f in mapped if not f.startswith(HOST_MOUNT + "/usr/")]
            assert mapped and outside == [], (pid, outside, sorted(mapped))
            for path, (dev, ino) in mapped.items():
                host = os.stat(path.removeprefix(HOST_MOUNT))
                assert (host.st_dev, host.st_ino) == (dev, ino), (pid, path)
        # The same start, run as a command in the planted sandbox with the supervisor's
        # environment (bwrap's, plus PYTHON* variables -I must ignore): sys.path is the
        # read-only stdlib only, and nothing planted runs in it.
        probe = "import sys; print(sys.executable, sys.prefix, sys.path)"
        start = host_python(HOST_MOUNT, "/usr/bin/python3", "-c", probe)
        same_start = shlex.join(start)
        inside = run(
            api, sid, f": > {MARKS}; env -i PATH=/usr/bin:/bin PYTHONPATH=/workspace/evilpy "
            f"PYTHONHOME=/usr/local PYTHONUSERBASE=/usr/local {same_start}; cat {MARKS}",
        )  # fmt: skip
        printed, _, marks = inside["stdout"].partition("\n")
        host_usr = HOST_MOUNT + "/usr"
        assert printed == (
            f"{host_usr}/bin/python3.11 {host_usr} ['{host_usr}/lib/python311.zip', "
            f"'{host_usr}/lib/python3.11', '{host_usr}/lib/python3.11/lib-dynload']"
        ), inside
        # (`env` itself, an ordinary command, gets the sandbox's LD_PRELOAD: its mark is fine.)
        assert [m for m in marks.splitlines() if m.split(" ", 1)[1].startswith(start[0])] == []
        # Commands keep the sandbox's own loader cache (ldconfig is theirs to use).
        after = run(api, sid, f"python3 -c pass; cat {MARKS}")["stdout"]
        assert "cache python3 -c pass" in after
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


# --- a supervisor that breaks the protocol ------------------------------------------------------
# The sandbox's root can no longer replace its supervisor, so the hostile peer is the test: as
# host root it takes a copy of the supervisor's end of the node's socket (pidfd_getfd) and
# speaks through it to the real server.

SYS_PIDFD_GETFD = 438  # x86_64, aarch64 and the rest of the generic table alike
LIBC = ctypes.CDLL(None, use_errno=True)


def supervisor_socket(server: Server, sid: str) -> socket.socket:
    """A duplicate of the sandbox supervisor's end of its socket to the node."""
    trusted = trusted_processes(server, sid)
    parents = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
               for pid in trusted}  # fmt: skip
    (supervisor,) = [pid for pid, ppid in parents.items() if ppid not in trusted]
    fd_inside = int(Path(f"/proc/{supervisor}/cmdline").read_bytes().split(b"\0")[-2])
    pidfd = os.pidfd_open(supervisor)
    try:
        fd = LIBC.syscall(SYS_PIDFD_GETFD, pidfd, fd_inside, 0)
        assert fd >= 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(pidfd)
    sock = socket.socket(fileno=fd)
    assert sock.type == socket.SOCK_SEQPACKET
    sock.settimeout(1.0)
    return sock


def new_sandbox(api: httpx.Client) -> str:
    resp = api.post("/v1/sandboxes", json={})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def wait_for_error(api: httpx.Client, sid: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        body = api.get(f"/v1/sandboxes/{sid}").json()
        if body["state"] == "error" or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


OVERSIZED = b'{"ev":"exit","id":"x","code":0,"signal":null,"pad":"' + b"x" * 100_000 + b'"}'
UNASKED = b'{"ev":"exit","id":"cmd_never_asked","code":0,"signal":null}'


def log_lines_about(server: Server, sid: str) -> int:
    return sum(sid in line for line in server.log_path.read_text(errors="replace").splitlines())


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        pytest.param([b"not json {"] * 20_000, "not JSON", id="malformed"),
        pytest.param([b"[" * 3000], "not JSON", id="deeply-nested"),
        pytest.param([OVERSIZED], "more than 4096 bytes", id="oversized"),
        pytest.param([UNASKED], "not asked to run", id="unasked-command"),
        pytest.param([b'{"ev":"exit","id":"cmd_x","code":"7"}'], "exit", id="bad-exit"),
    ],
)
def test_a_supervisor_breaking_the_protocol_stops_its_sandbox(
    server: Server, api: httpx.Client, frames: list[bytes], reason: str
) -> None:
    sid = new_sandbox(api)
    try:
        lines_before = log_lines_about(server, sid)
        with supervisor_socket(server, sid) as peer:
            with contextlib.suppress(OSError):  # the node may close it half-way: it should
                for frame in frames:
                    peer.send(frame)
        body = wait_for_error(api, sid, 5)
        assert body["state"] == "error", body
        assert "supervisor broke its protocol" in body["error"] and reason in body["error"], body
        # One line for the stop, however many bad frames were sent.
        assert log_lines_about(server, sid) - lines_before <= 3
        resp = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "true"})
        assert resp.status_code in (409, 503), resp.text
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


# Sends harmless messages (alone) as fast as it can until the node closes the socket; prints
# how many. A process of its own, so that the test's measurements do not share its GIL.
FLOOD = """
import socket, sys
peer = socket.socket(fileno=int(sys.argv[1]))
peer.setblocking(True)
sent = 0
try:
    while True:
        peer.send(b'{"ev":"ready"}')
        sent += 1
except OSError:
    pass
print(sent, flush=True)
"""


def healthz_latency(server: Server) -> float:
    began = time.monotonic()
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    return time.monotonic() - began


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_flooding_supervisor_is_stopped_and_the_node_stays_responsive(
    server: Server, api: httpx.Client
) -> None:
    sid, bystander = new_sandbox(api), new_sandbox(api)
    try:
        calm = sorted(healthz_latency(server) for _ in range(11))
        lines_before = log_lines_about(server, sid)
        assert server.proc is not None
        cpu_before, began = cpu_seconds(server.proc.pid), time.monotonic()
        with supervisor_socket(server, sid) as peer:
            flooder = subprocess.Popen(
                [sys.executable, "-c", FLOOD, str(peer.fileno())],
                pass_fds=[peer.fileno()], stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
        try:
            flooded = []
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                flooded.append(healthz_latency(server))
                if api.get(f"/v1/sandboxes/{sid}").json()["state"] == "error":
                    break
                time.sleep(0.05)
            server_cpu = (cpu_seconds(server.proc.pid) - cpu_before) / (time.monotonic() - began)
            other = api.post(f"/v1/sandboxes/{bystander}/exec", json={"command": "echo ok"})
        finally:
            flooder.kill()
            sent, _ = flooder.communicate(timeout=10)
        body = api.get(f"/v1/sandboxes/{sid}").json()
        flooded.sort()
        median, worst = flooded[len(flooded) // 2], flooded[-1]
        print(
            f"\nflood: {sent.strip() or '?'} messages sent; /healthz median {median * 1000:.0f} "
            f"ms, worst {worst * 1000:.0f} ms (before it: median {calm[5] * 1000:.0f} ms, worst "
            f"{calm[-1] * 1000:.0f} ms); server CPU {server_cpu:.0%}; error: {body['error']}"
        )
        assert body["state"] == "error", body
        assert "supervisor broke its protocol" in body["error"] and "a second" in body["error"]
        # The flood costs the server little CPU (reading without a budget: 33% here, all one
        # flooder could send); the machine's own load shows in /healthz before and during it.
        assert server_cpu < 0.2, server_cpu
        assert median < max(0.1, 3 * calm[5]) and worst < 1.0, (flooded, calm)
        assert other.status_code == 200 and other.json()["stdout"] == "ok\n", other.text
        assert log_lines_about(server, sid) - lines_before <= 5
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
        api.delete(f"/v1/sandboxes/{bystander}")


def test_a_burst_within_the_budget_is_not_a_violation(server: Server, api: httpx.Client) -> None:
    sid = new_sandbox(api)
    try:
        with supervisor_socket(server, sid) as peer:
            for _ in range(3000):
                peer.send(b'{"ev":"ready"}')
        time.sleep(0.5)
        result = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "exit 7"}).json()
        assert result["exit_code"] == 7
        assert api.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
