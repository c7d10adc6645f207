"""The escape battery of SANDBOX.md ("Tests that prove it"): hostile code inside a sandbox tries
each way out, and every attempt must be contained.

Each probe has an id, a category and its expected outcome (the table PROBES below). Most run
inside one sandbox in a single exec: a runner there forks per probe, so every result stays
separate; a second batch runs as the sandbox's own root (sudo), which must stay inside too.
Cross-sandbox probes run in two sandboxes at once: the first (which made the state) is the
control that must see it, the second must not. The rest are driven from the host: a TCP service
and an abstract socket the test opens, and links, FIFOs and deep trees planted in /workspace and
/tmp for the server's code that handles a sandbox's files (delete, stop and start, the emptying
of /tmp at each start, the files API); on the host they are under <id>/disk, the mount point of
the sandbox's ext4 image <id>/disk.img: tmp/ and the writable layers of its copy-on-write root,
/usr and /workspace (root-upper, usr-upper, ws-upper).

The battery ends with "N probes, 0 escaped" (also in the terminal summary) and fails on any
escape; a known escape is marked xfail (strict) on its own probe, with the reason. A known and
accepted finding (documented, e.g. an information disclosure) is not an escape: its probe records
what it sees, passes while the finding stays within its accepted bound, and the summary lists it
apart. It uses a dedicated server (default settings: every sandbox has its own ext4 disk), so
host-side checks see only its sandboxes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.runtime.loader import host_python
from corral.runtime.namespaces import HOST_MOUNT
from corral.runtime.rootfs import RootLayout
from corral.runtime.uids import SANDBOX_UID, SLOT_UIDS, to_host
from tests.conftest import UID_BLOCK, Server
from tests.integration.helpers import server_processes
from tests.security import conftest as security_conftest
from tests.security.helpers import (
    create_sandbox,
    dedicated_server,
    delete_sandbox,
    disk_dir,
    exec_,
    root_layout,
    run_probes,
    sandbox,
    sandbox_dir,
    start,
    wait_until,
)

pytestmark = pytest.mark.sandbox

PRIVILEGE = "privilege"
FILESYSTEM = "mounts and filesystem"
KERNEL = "kernel surface"
PROCSYS = "/proc and /sys"
TTY = "tty injection"
FDS = "inherited descriptors"
NETWORK = "network"
CROSS = "cross-sandbox"
RESOURCES = "resources"
HOSTFILES = "host-side file handling"

# The host's glibc loader, from the read-only bind of the host's /usr, by which the supervisor
# (and its launcher) start: argv[0] in their cmdline.
TRUSTED_LOADER = host_python(HOST_MOUNT, "/usr/bin/python3")[0]
CATEGORIES = (
    PRIVILEGE,
    FILESYSTEM,
    KERNEL,
    PROCSYS,
    TTY,
    FDS,
    NETWORK,
    CROSS,
    RESOURCES,
    HOSTFILES,
)

Check = Callable[[Any, "Env"], bool]


@dataclass(frozen=True)
class Probe:
    id: str
    category: str
    expect: str  # the outcome that means "contained"
    check: Check  # (value, env) -> True when contained
    py: str | None = None  # Python run in the sandbox (prelude helpers available); sets `result`
    sh: str | None = None  # bash run in the sandbox; value {"rc", "out", "err"}
    cross: bool = False  # py run in sandbox A (made the state) and B; value {"a", "b"}
    host: Callable[[Env], Any] | None = None  # driven from the host; returns the value
    escape: str | None = None  # a known escape: the probe is xfail(strict) with this reason
    # A known finding that is accepted (documented, not an escape): the probe records what it
    # sees and passes; `check` then bounds the finding (anything beyond it is an escape).
    accepted: str | None = None
    i386: bool = False  # uses int 0x80: skipped (not faked) if the kernel has no IA32 entry
    requires: str | None = None  # a ctx entry it needs; skipped when the host lacks it
    user: str = "user"  # "root": run as the sandbox's own root (sudo), uid 0 inside only


# --- building blocks -------------------------------------------------------------------------


def is_(*allowed: Any) -> Check:
    return lambda v, _e: v in allowed


def ok_rc_nonzero(v: Any, _e: Env) -> bool:
    return v["rc"] != 0


def status_py(*fields: str) -> str:
    return (
        "f = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
        f"result = {{k: f[k].strip() for k in {fields!r}}}"
    )


def with_control(expr: str) -> str:
    """An i386 probe: its result, plus proof that int 0x80 really reaches the kernel here."""
    leave = "if r == 0:\n    os._exit(0)\n" if "int80(120," in expr else ""  # a clone's child
    return f"ctl = int80(20) == os.getpid()\nr = {expr}\n{leave}result = {{'control': ctl, 'r': r}}"


def controlled(expected: str) -> Check:
    return lambda v, _e: v["control"] is True and v["r"] == expected


def clone_py(flags: int) -> str:
    return (
        "ctl = sc(56, 17, 0, 0, 0, 0)\n"  # a plain fork works (control)
        "if ctl == 0:\n    os._exit(0)\n"
        "if isinstance(ctl, int):\n    os.waitpid(ctl, 0)\n"
        f"r = sc(56, {flags:#x} | 17, 0, 0, 0, 0)\n"
        "if r == 0:\n    os._exit(0)\n"
        "if isinstance(r, int):\n    os.waitpid(r, 0)\n"
        "result = {'control': isinstance(ctl, int) and ctl > 0, 'r': r}"
    )


def tty_py(expr: str) -> str:
    """A probe on a pty that is this process's controlling terminal (TIOCSTI would work)."""
    return (
        "import fcntl, termios\n"
        "os.setsid()\n"
        "m, s = os.openpty()\n"
        "fcntl.ioctl(s, termios.TIOCSCTTY, 0)\n"
        f"r = {expr}\n"
        "pending = struct.unpack('i', fcntl.ioctl(s, termios.FIONREAD, b'\\0' * 4))[0]\n"
        "winsz = sc(16, s, termios.TIOCGWINSZ, ctypes.create_string_buffer(8))\n"
        "result = {'control': winsz == 0, 'r': r, 'pending': pending}"
    )


def tty_denied(v: Any, _e: Env) -> bool:
    return v["control"] is True and v["r"] == "EPERM" and v["pending"] == 0


def absent(pid: str, path_expr: str, what: str) -> Probe:
    return Probe(
        pid,
        FILESYSTEM,
        f"{what} is not visible in the sandbox",
        is_(False),
        py=f"result = os.path.lexists({path_expr})",
    )


def no_secrets(v: Any, e: Env) -> bool:
    text = str(v)
    return not any(s in text for s in e.secrets()) and len(text) > 0


def not_connected(v: Any, _e: Env) -> bool:
    return v is not None and v != "timeout"


def cross_found(v: Any, _e: Env) -> bool:
    return v["a"] is True and v["b"] is False


# Raw syscalls the filter denies (SANDBOX.md), with arguments that an unfiltered kernel would
# mostly answer differently (success, EFAULT, EBADF...), so the errno shows the filter.
DENIED_EPERM = [
    ("keyctl", "sc(250, 0, -3, 1)"),  # KEYCTL_GET_KEYRING_ID(session keyring, create)
    ("add_key", "sc(248, b'user', b'corral', b'x', 1, -3)"),
    ("request_key", "sc(249, b'user', b'corral', 0, 0)"),
    ("bpf", "sc(321, 0, ctypes.create_string_buffer(128), 128)"),
    ("perf_event_open", "sc(298, ctypes.create_string_buffer(128), 0, -1, -1, 0)"),
    ("userfaultfd", "sc(323, 1)"),  # UFFD_USER_MODE_ONLY: allowed unprivileged without it
    ("io_uring_setup", "sc(425, 1, ctypes.create_string_buffer(120))"),
    ("io_uring_enter", "sc(426, -1, 0, 0, 0, 0, 0)"),
    ("io_uring_register", "sc(427, -1, 0, 0, 0)"),
    ("fanotify_init", "sc(300, 0, 0)"),
    ("syslog", "sc(103, 10, 0, 0)"),
    ("acct", "sc(163, 0)"),
    ("quotactl", "sc(179, 0, 0, 0, 0)"),
    ("uselib", "sc(134, b'/usr/lib/x86_64-linux-gnu/libc.so.6')"),
    ("modify_ldt", "sc(154, 0, ctypes.create_string_buffer(16), 16)"),
    ("move_pages", "sc(279, 0, 0, 0, 0, 0, 0)"),
    ("mbind", "sc(237, 0, 0, 0, 0, 0, 0)"),
    ("set_mempolicy", "sc(238, 0, 0, 0)"),
    ("migrate_pages", "sc(256, 0, 0, 0, 0)"),
    ("kexec_load", "sc(246, 0, 0, 0, 0)"),
    ("kexec_file_load", "sc(320, -1, -1, 0, b'', 0)"),
    ("init_module", "sc(175, 0, 0, b'')"),
    ("finit_module", "sc(313, -1, b'', 0)"),
    ("delete_module", "sc(176, b'corral', 0)"),
    ("reboot", "sc(169, 0xfee1dead, 0x28121969, 0, 0)"),  # LINUX_REBOOT_CMD_CAD_OFF
    ("swapon", "sc(167, b'/workspace/swap', 0)"),
    ("swapoff", "sc(168, b'/workspace/swap')"),
    ("iopl", "sc(172, 3)"),
    ("ioperm", "sc(173, 0x80, 1, 1)"),
    ("settimeofday", "sc(164, 0, 0)"),  # both NULL: a no-op that succeeds unfiltered
    ("clock_settime", "sc(227, 0, 0)"),
    ("clock_adjtime", "sc(305, 0, ctypes.create_string_buffer(256))"),  # modes 0: a read
    ("adjtimex", "sc(159, ctypes.create_string_buffer(256))"),
    ("process_vm_writev", "sc(311, os.getpid(), 0, 0, 0, 0, 0)"),
    ("kcmp", "sc(312, os.getpid(), os.getpid(), 0, 0, 0)"),
    ("pidfd_getfd", "sc(438, os.pidfd_open(os.getpid()), 0, 0)"),
    ("unshare", "sc(272, 0)"),  # even unshare(0), a no-op unfiltered
    ("unshare_newuser", "sc(272, 0x10000000)"),
    ("setns", "sc(308, os.open('/proc/self/ns/net', os.O_RDONLY), 0)"),
    ("mount", "sc(165, b'none', b'/tmp', b'tmpfs', 0, 0)"),
    ("umount2", "sc(166, b'/workspace', 2)"),  # MNT_DETACH
    ("pivot_root", "sc(155, b'/tmp', b'/tmp')"),
    ("chroot", "sc(161, b'/tmp')"),
]
DENIED_ENOSYS = [
    ("clone3", "sc(435, 0, 0)"),
    ("open_tree", "sc(428, -100, b'/', 0)"),  # would return an O_PATH fd unfiltered
    ("move_mount", "sc(429, -1, b'', -1, b'', 0)"),
    ("fsopen", "sc(430, b'tmpfs', 0)"),
    ("fsconfig", "sc(431, -1, 0, 0, 0, 0)"),
    ("fsmount", "sc(432, -1, 0, 0)"),
    ("fspick", "sc(433, -100, b'/', 0)"),
    ("mount_setattr", "sc(442, -1, b'', 0, 0, 0)"),
]
CLONE_FLAGS = {
    "newns": 0x00020000,
    "newcgroup": 0x02000000,
    "newuts": 0x04000000,
    "newipc": 0x08000000,
    "newuser": 0x10000000,
    "newpid": 0x20000000,
    "newnet": 0x40000000,
}
SYSCTL_WRITES = [
    "kernel/hostname",
    "kernel/domainname",
    "kernel/core_pattern",
    "kernel/modprobe",
    "kernel/sysrq",
    "kernel/randomize_va_space",
    "vm/drop_caches",
    "vm/overcommit_memory",
    "fs/protected_hardlinks",
    "net/ipv4/ip_forward",
    "net/core/somaxconn",
]
# CHOWN, DAC_OVERRIDE, FOWNER, SETGID, SETUID, SETPCAP (the supervisor's, so that ordinary
# commands can empty their bounding set): what sudo may keep, scoped to the user namespace.
ROOT_CAPS = 0x1CB
DEFAULT_DISK = 10240 << 20  # CORRAL_DEFAULT_DISK_MB's default: every sandbox's own ext4
# The host's own file system is in the sandbox only as the read-only bind of its /usr (the
# sandbox's /, /usr and /workspace are overlays, which give no handles): a handle of a file
# there is real (the control), and a forged one of inode 2 would be the host's root directory.
OPEN_BY_HANDLE = (
    "buf = ctypes.create_string_buffer(8 + 128)\n"
    "struct.pack_into('I', buf, 0, 128)\n"
    "mount_id = ctypes.c_int()\n"
    f"control = sc(303, -100, b'{HOST_MOUNT}/usr/bin', buf, ctypes.byref(mount_id), 0)\n"
    f"fd = os.open('{HOST_MOUNT}/usr', os.O_RDONLY)\n"
    "forged = ctypes.create_string_buffer(struct.pack('IiII', 8, 1, 2, 0))\n"  # ino 2
    "result = {'control': control, 'own': sc(304, fd, buf, 0),\n"
    "          'host_root': sc(304, fd, forged, 0),\n"
    "          'via_own_usr': sc(304, os.open('/usr', os.O_RDONLY), forged, 0)}"
)
# A directory of the sandbox's root: owner and mode inside, its listing (or the errno), and
# whether it is of the sandbox's root file system or the host's.
OWN_DIR = (
    "st = os.stat('{path}')\n"
    "result = {{'owner_mode': [st.st_uid, oct(st.st_mode & 0o7777)],\n"
    "          'list': err(os.listdir, '{path}') or sorted(os.listdir('{path}')),\n"
    "          'own_fs': st.st_dev == os.stat('/').st_dev,\n"
    "          'host_fs': st.st_dev == CTX['host_root_dev']}}\n"
)
HANDLES_DENIED = {"control": 0, "own": "EPERM", "host_root": "EPERM", "via_own_usr": "EPERM"}
SYSCTL_SWEEP = (
    "def rewrite(p):\n"
    "    fd = os.open(p, os.O_WRONLY)\n"
    "    try:\n"
    "        os.write(fd, open(p, 'rb').read() or b'0')\n"
    "    finally:\n"
    "        os.close(fd)\n"
    "seen, opened, written = 0, [], []\n"
    "for d, _, files in os.walk('/proc/sys'):\n"
    "    for f in files:\n"
    "        seen += 1\n"
    "        p = d + '/' + f\n"
    "        if err(lambda: os.close(os.open(p, os.O_WRONLY))) is None:\n"
    "            opened.append(p)\n"
    "            if err(rewrite, p) is None:\n"
    "                written.append(p)\n"
    "result = {'seen': seen, 'opened': opened, 'written': written}"
)
PTRACE_SUPERVISOR = (
    "sup = supervisor_pid()\n"
    "result = sc(101, 16, sup, 0, 0)\n"
    "if result == 0:\n"
    "    os.waitpid(sup, 0x40000000)\n"  # __WALL
    "    sc(101, 17, sup, 0, 0)"  # PTRACE_DETACH: leave it running
)
# The socket's descriptor is the supervisor's first argument (the one after its script).
OPEN_SUPERVISOR_SOCKET = (
    "sup = supervisor_pid()\n"
    # The socket's descriptor is the supervisor's last argument.
    "fd = open('/proc/%d/cmdline' % sup, 'rb').read().split(b'\\0')[-2].decode()\n"
    "result = err(os.open, '/proc/%d/fd/%s' % (sup, fd), os.O_RDWR)"
)
# Sysctls that belong to a namespace the sandbox owns (its IPC, pid, UTS and net namespaces):
# its own root may change them for itself.
NAMESPACED_SYSCTLS = (
    "kernel/shm", "kernel/msg", "kernel/sem", "kernel/auto_msgmni", "fs/mqueue/",
    "kernel/pid_max", "kernel/ns_last_pid", "kernel/hostname", "kernel/domainname", "net/",
)  # fmt: skip
NEW_SYSCTLS = {
    "kernel/shmmax": "123456789",
    "kernel/msgmax": "4242",
    "fs/mqueue/msg_max": "42",
    "kernel/pid_max": "4242",
}
XS_KEY = 0x5EC0DE
XS_PORT = 47123


# --- host-driven probes ----------------------------------------------------------------------


def host_bash_fds(e: Env) -> Any:
    # A shell-string command as users send it: bash's own descriptors, listed from a child.
    return exec_(e.api, e.main_sid, "ls /proc/$$/fd; true")["stdout"].split()


def host_pids_cap(e: Env) -> Any:
    script = (
        "import errno, json, os, signal, time\n"
        "kids, error = [], None\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as exc:\n"
        "        error = errno.errorcode.get(exc.errno)\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "for k in kids:\n"
        "    os.kill(k, signal.SIGKILL)\n"
        "    os.waitpid(k, 0)\n"
        "print(json.dumps({'forked': len(kids), 'error': error}))\n"
    )
    with sandbox(e.api, pids=16) as sid:
        result = exec_(e.api, sid, "python3", args=["-c", script], timeout_ms=20_000)
    return json.loads(result["stdout"])


def host_memory_cap(e: Env) -> Any:
    with sandbox(e.api, memory_mb=32) as sid:
        result = exec_(
            e.api, sid, "python3", args=["-c", "x = b'x' * (256 << 20)"], timeout_ms=20_000
        )
    return {k: result[k] for k in ("status", "exit_code", "oom_killed", "peak_memory_bytes")}


def _left(e: Env, marker: str) -> list[Any]:
    return [p for p in server_processes(e.server.uid_base) if marker in p[2]]


def host_timeout_kills_daemons(e: Env) -> Any:
    command = (
        "setsid sh -c 'sleep 3171 & exec sleep 3172' & "
        "nohup sleep 3173 >/dev/null 2>&1 & "
        "(trap '' TERM HUP; exec sleep 3174) & sleep 3175"
    )
    result = exec_(e.api, e.main_sid, command, timeout_ms=1000)
    wait_until(lambda: not _left(e, "sleep 317"), 15.0)
    return {"status": result["status"], "left": _left(e, "sleep 317")}


def host_delete_kills_background(e: Env) -> Any:
    sid = create_sandbox(e.api)
    try:
        exec_(e.api, sid, "setsid sleep 3181 </dev/null >/dev/null 2>&1 &")
        seen = wait_until(lambda: bool(_left(e, "sleep 3181")), 15.0)
        uids = {p[1] for p in _left(e, "sleep 3181")}
    finally:
        status = delete_sandbox(e.api, sid).status_code
    wait_until(lambda: not _left(e, "sleep 3181"), 15.0)
    same_uid = [p for p in server_processes(e.server.uid_base) if p[1] in uids]
    return {"seen": seen, "status": status, "left": _left(e, "sleep 3181"), "uid_left": same_uid}


# Where a sandbox's writes land, seen from inside: /tmp is its disk itself; /, /usr (so
# /usr/local) and /workspace are overlays whose writable layers are on it, so statvfs of each
# gives the disk's figures.
FS_FIGURES = (
    "def figures(p):\n    s = os.statvfs(p)\n    return [s.f_blocks * s.f_frsize, s.f_files]\n"
)
FALLOCATE = (
    "def reserve(path):\n"
    "    fd = os.open(path, os.O_CREAT | os.O_WRONLY)\n"
    "    try:\n"
    "        os.posix_fallocate(fd, 0, 11 << 30)\n"
    "        return 'ok'\n"
    "    except OSError as exc:\n"
    "        return errno.errorcode.get(exc.errno, str(exc.errno))\n"
    "    finally:\n"
    "        os.close(fd)\n"
    "        os.unlink(path)\n"
)


def host_default_workspace(e: Env) -> Any:
    """A sandbox created with defaults: the size of /workspace (and whether /tmp, /usr/local,
    /usr and / are of its file system), and reservations of more than the default disk by the
    user in /workspace and by the sandbox's root in /usr and /root (unwritten extents: nothing
    is written to the host's disk either way)."""
    script = (
        "import errno, json, os\n" + FS_FIGURES + FALLOCATE +
        "paths = ('/workspace', '/tmp', '/usr/local', '/usr', '/')\n"
        "print(json.dumps({'figures': {p: figures(p) for p in paths},\n"
        "                  'grew': {p: reserve(p) for p in sys.argv[1:]}}))\n"
    )  # fmt: skip
    script = "import sys\n" + script
    host = os.statvfs(e.server.data_dir)
    with sandbox(e.api) as sid:
        user = exec_(e.api, sid, "python3", args=["-c", script, "/workspace/fill"])
        root = exec_(
            e.api, sid, "python3", args=["-c", script, "/usr/fill", "/root/fill"], user="root"
        )
        out = json.loads(user["stdout"])
        grew = {**out["grew"], **json.loads(root["stdout"])["grew"]}
    size = out["figures"]["/workspace"][0]
    return {
        "size": size,
        "host_size": host.f_blocks * host.f_frsize,
        "same_fs_as_host": size == host.f_blocks * host.f_frsize,
        "one_fs": len({tuple(f) for f in out["figures"].values()}) == 1,
        "fallocate_11GiB": grew,
    }


def default_workspace_ok(v: Any, _e: Env) -> bool:
    return (
        v["same_fs_as_host"] is False
        and 0.95 * DEFAULT_DISK < v["size"] <= DEFAULT_DISK
        and v["one_fs"] is True
        and v["fallocate_11GiB"]
        == {"/workspace/fill": "ENOSPC", "/usr/fill": "ENOSPC", "/root/fill": "ENOSPC"}
    )


def _mounts_of(path: Path) -> list[str]:
    return [
        line for line in Path("/proc/self/mounts").read_text().splitlines() if str(path) in line
    ]


def _loops_of(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if str(path) in line]


def host_disk_released(e: Env) -> Any:
    sid = create_sandbox(e.api, disk_mb=32)
    sbdir = e.sandbox_dir(sid)
    try:
        exec_(e.api, sid, "echo x > /workspace/x")
        alive = bool(_mounts_of(sbdir))
    finally:
        delete_sandbox(e.api, sid)
    wait_until(lambda: not _loops_of(sbdir), 15.0)
    return {
        "mounted_while_alive": alive,
        "mounts_after": _mounts_of(sbdir),
        "loops_after": _loops_of(sbdir),
    }


def host_workspace_disk(e: Env) -> Any:
    with sandbox(e.api, disk_mb=64) as sid:
        result = exec_(
            e.api,
            sid,
            "fallocate -l 256M /workspace/fill; rc=$?; ls -l /workspace/fill; "
            "rm -f /workspace/fill; exit $rc",
        )
    return {"rc": result["exit_code"], "out": result["stdout"], "err": result["stderr"]}


PLANT_LINKS = """
set -e
ln -s {canary}/secret /workspace/l-file
ln -s {canary} /workspace/l-dir
mkdir -p /workspace/sub/deeper
ln -s {canary}/d /workspace/sub/deeper/l-d
ln -s /etc/shadow /workspace/shadow
ln -s /etc /workspace/l-etc
ln -s {data_dir} /workspace/l-data
ln -s ../../../../../../../../.. /workspace/up
ln -s / /workspace/root
"""
# The sandbox's root owns its /usr, /etc, /root and /home (copy-on-write): links there too,
# one of them replacing a file the node wrote (/etc/hostname).
PLANT_ROOT_LINKS = (
    "ln -s {canary} /usr/local/l-dir && ln -s / /usr/local/l-root && "
    "ln -s {data_dir} /usr/lib/l-data && ln -s {canary}/secret /root/l-file && "
    "ln -s / /home/l-root && ln -sfn {canary}/secret /etc/hostname"
)


def host_symlinks_on_delete(e: Env) -> Any:
    sid = create_sandbox(e.api)
    planted = exec_(e.api, sid, PLANT_LINKS.format(**e.ctx))
    assert planted["exit_code"] == 0, planted
    planted = exec_(e.api, sid, PLANT_ROOT_LINKS.format(**e.ctx), user="root")
    assert planted["exit_code"] == 0, planted
    sbdir, layout = e.sandbox_dir(sid), e.root_layout(sid)
    # The host sees the links, in the writable layers on the sandbox's disk.
    assert layout.writable == e.disk_dir(sid)
    for link in (
        layout.workspace_upper / "l-dir", layout.usr_upper / "local" / "l-root",
        layout.usr_upper / "lib" / "l-data", layout.upper / "root" / "l-file",
        layout.upper / "home" / "l-root", layout.upper / "etc" / "hostname",
    ):  # fmt: skip
        assert link.is_symlink(), link
    before = e.snapshot()
    status = delete_sandbox(e.api, sid).status_code
    return {
        "status": status,
        "removed": not sbdir.exists(),
        "host_unchanged": before == e.snapshot(),
        "server_healthy": e.api.get("/healthz").status_code == 200,
    }


def host_hardlinks(e: Env) -> Any:
    links = (
        "result = {\n"
        "  'canary': err(os.link, CTX['canary'] + '/secret', '/workspace/h1'),\n"
        "  'etc': err(os.link, '/etc/passwd', '/workspace/h2'),\n"
        "  'usr': err(os.link, '/usr/bin/bash', '/workspace/h3'),\n"
        "  'proc': err(os.link, '/proc/self/exe', '/workspace/h4'),\n"
        "}"
    )
    sid = create_sandbox(e.api)
    before = e.snapshot()
    try:
        out = run_probes(e.api, sid, [{"id": "links", "py": links}], e.ctx)["links"]
        during = e.snapshot()  # a link that got through would show in st_nlink now
    finally:
        status = delete_sandbox(e.api, sid).status_code
    unchanged = before == during == e.snapshot()
    return {**out.get("value", out), "status": status, "host_unchanged": unchanged}


def host_fifos_on_delete(e: Env) -> Any:
    sid = create_sandbox(e.api)
    plant = (
        "set -e; mkfifo /workspace/data.txt /workspace/output.log; mkdir -p /workspace/logs; "
        "mkfifo /workspace/logs/server.log; "
        "python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"/workspace/app.sock\")'"
    )
    assert exec_(e.api, sid, plant)["exit_code"] == 0
    start(e.api, sid, "cat /workspace/data.txt")  # a reader blocked on the FIFO
    start(e.api, sid, "echo x > /workspace/output.log")  # a writer blocked on the FIFO
    sbdir = e.sandbox_dir(sid)
    began = time.monotonic()
    status = delete_sandbox(e.api, sid).status_code
    return {
        "status": status,
        "seconds": round(time.monotonic() - began, 2),
        "removed": not sbdir.exists(),
    }


def host_stop_start(e: Env) -> Any:
    sid = create_sandbox(e.api)
    try:
        assert exec_(e.api, sid, PLANT_LINKS.format(**e.ctx))["exit_code"] == 0
        plant_root = exec_(e.api, sid, PLANT_ROOT_LINKS.format(**e.ctx), user="root")
        assert plant_root["exit_code"] == 0, plant_root
        before = e.snapshot()
        stop = e.api.post(f"/v1/sandboxes/{sid}/stop").status_code
        begin = e.api.post(f"/v1/sandboxes/{sid}/start").status_code
        kept = exec_(e.api, sid, "readlink /workspace/l-file /workspace/sub/deeper/l-d")
        return {
            "stop": stop,
            "start": begin,
            "host_unchanged": before == e.snapshot(),
            "links_kept": kept["stdout"].split() == [f"{e.canary}/secret", f"{e.canary}/d"],
        }
    finally:
        delete_sandbox(e.api, sid)


PLANT_TMP = """
set -e
ln -s {canary} /tmp/l-dir
ln -s {canary}/secret /tmp/l-file
ln -s / /tmp/root
ln -s {data_dir} /tmp/l-data
mkdir /tmp/sub && ln -s {canary} /tmp/sub/l-dir
mkfifo /tmp/fifo
echo kept > /workspace/kept
python3 -c '
import os
fd = os.open("/tmp", os.O_RDONLY)
for _ in range(2000):
    os.mkdir("d", dir_fd=fd)
    nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    fd = nfd
'
"""


def host_tmp_cleared(e: Env) -> Any:
    """/tmp is a directory of the sandbox's disk that the server (as host root) empties at each
    start: planted links to the host, a FIFO and a 2000-deep tree must be removed without being
    followed or failing the start."""
    sid = create_sandbox(e.api)
    try:
        planted = exec_(e.api, sid, PLANT_TMP.format(**e.ctx))
        assert planted["exit_code"] == 0, planted
        before = e.snapshot()
        stop = e.api.post(f"/v1/sandboxes/{sid}/stop").status_code
        begin = e.api.post(f"/v1/sandboxes/{sid}/start").status_code
        after = exec_(e.api, sid, "ls -A /tmp; cat /workspace/kept")
        return {
            "stop": stop,
            "start": begin,
            "tmp_left": after["stdout"].split()[:-1],
            "workspace_kept": after["stdout"].split()[-1:] == ["kept"],
            "host_unchanged": before == e.snapshot(),
            "canary_intact": sorted(p.name for p in e.canary.rglob("*")) == ["d", "f", "secret"],
        }
    finally:
        delete_sandbox(e.api, sid)


def host_deep_tree(e: Env) -> Any:
    plant = (
        "import os\n"
        "fd = os.open('/workspace', os.O_RDONLY)\n"
        "for _ in range(2000):\n"
        "    os.mkdir('d', dir_fd=fd)\n"
        "    nfd = os.open('d', os.O_RDONLY, dir_fd=fd)\n"
        "    os.close(fd)\n"
        "    fd = nfd\n"
    )
    sid = create_sandbox(e.api)
    sbdir = e.sandbox_dir(sid)
    try:
        assert exec_(e.api, sid, "python3", args=["-c", plant])["exit_code"] == 0
        resp = delete_sandbox(e.api, sid)
        return {"status": resp.status_code, "removed": not sbdir.exists()}
    finally:
        if sbdir.exists():  # what the server left: remove it (rm copes with any depth)
            subprocess.run(["rm", "-rf", str(sbdir)], check=False)
            for _ in range(3):  # the server may drop the connection that got the 500
                try:
                    delete_sandbox(e.api, sid)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)


def host_private_dirs(e: Env) -> Any:
    with sandbox(e.api) as sid:
        plant = "cp /usr/bin/bash /workspace/rootsh && chmod 4755 /workspace/rootsh"
        made = exec_(e.api, sid, plant)
        assert made["exit_code"] == 0, made
        sbdir, disk, layout = e.sandbox_dir(sid), e.disk_dir(sid), e.root_layout(sid)
        assert layout.writable == disk
        root, ws = os.lstat(disk), os.lstat(layout.workspace_upper)
        planted = os.lstat(layout.workspace_upper / "rootsh")

        def owner_mode(path: Path) -> tuple[int, str]:
            st = os.lstat(path)
            return st.st_uid, oct(st.st_mode & 0o7777)

        mounts = [line.split() for line in _mounts_of(disk)]
        return {
            "parent": owner_mode(sbdir.parent),
            "dir": owner_mode(sbdir),
            "image": owner_mode(sbdir / "disk.img"),
            "disk_root_uid": root.st_uid,
            "workspace_uid": ws.st_uid,
            "root_upper": owner_mode(layout.upper),
            "usr_upper": owner_mode(layout.usr_upper),
            "work_dirs": sorted(
                {owner_mode(p) for p in disk.iterdir() if p.name.endswith("-work")}
            ),
            "tmp": owner_mode(disk / "tmp"),
            "setuid_file": (planted.st_uid, oct(planted.st_mode & 0o7777)),
            "disk_mounts": [(m[1] == str(disk), m[2], sorted(m[3].split(","))) for m in mounts],
        }


def host_root_files(e: Env) -> Any:
    """Files root inside makes, and its setuid copy of /usr/bin/bash, as the host has them (in
    the writable layers on the sandbox's disk)."""
    plant = (
        "touch /workspace/root-file /usr/local/root-file /root/root-file /etc/root-file && "
        "cp /usr/bin/bash /workspace/root-sh && chmod 4755 /workspace/root-sh /usr/bin/bash && "
        "chown 0:0 /workspace/root-file /workspace/root-sh"
    )
    with sandbox(e.api) as sid:
        made = exec_(e.api, sid, plant, user="root")
        assert made["exit_code"] == 0, made
        layout = e.root_layout(sid)
        paths = [
            layout.workspace_upper / "root-file", layout.workspace_upper / "root-sh",
            layout.usr_upper / "local" / "root-file", layout.upper / "root" / "root-file",
            layout.upper / "etc" / "root-file", layout.usr_upper / "bin" / "bash",
        ]  # fmt: skip
        return [os.lstat(path).st_uid for path in paths]


def _host_file(path: Path) -> tuple[Any, ...]:
    st = os.lstat(path)
    return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest())  # fmt: skip


# Python, not a shell: a running bash would make its own file busy (ETXTBSY).
USR_COPY_CHANGE = """
import os
with open("/usr/bin/bash", "ab") as f:
    f.write(b"CORRAL-COW")
os.chown("/usr/bin/bash", 1, 1)
with open("/etc/passwd", "a") as f:
    f.write("corral-cow:x:4242:4242::/:/bin/false\\n")
st = os.stat("/usr/bin/bash")
print(open("/usr/bin/bash", "rb").read()[-10:].decode(errors="replace"),
      "%d:%d" % (st.st_uid, st.st_gid), open("/etc/passwd").read().splitlines()[-1])
"""
USR_COPY_LOOK = """
import hashlib, os
st = os.stat("/usr/bin/bash")
print(hashlib.sha256(open("/usr/bin/bash", "rb").read()).hexdigest(),
      "%d:%d" % (st.st_uid, st.st_gid), open("/etc/passwd").read().count("corral-cow"))
"""


def host_usr_copy(e: Env) -> Any:
    """The sandbox's root changes /usr/bin/bash (a write, a chown) and /etc/passwd: its own
    copies change; the host's files, and what a second sandbox sees, do not. Once, for the
    probes that read it."""
    if e.usr_copy is not None:
        return e.usr_copy
    files = [Path("/usr/bin/bash"), Path("/etc/passwd")]
    before = [_host_file(p) for p in files]
    with sandbox(e.api) as a:
        changed = exec_(e.api, a, "python3", args=["-c", USR_COPY_CHANGE], user="root")
        layout = e.root_layout(a)
        copy = layout.usr_upper / "bin" / "bash"
        # The sandbox's directory belongs to the host uid of its user (uids.py).
        base = os.stat(e.sandbox_dir(a)).st_uid - SANDBOX_UID
        with sandbox(e.api) as b:
            other = exec_(e.api, b, "python3", args=["-c", USR_COPY_LOOK])
        e.usr_copy = {
            "changed": [changed["exit_code"], *changed["stdout"].split()],
            "copy_owner": (os.lstat(copy).st_uid, os.lstat(copy).st_gid),
            "copy_tail": copy.read_bytes()[-10:].decode(errors="replace"),
            "expected_owner": (to_host(base, 1), to_host(base, 1)),
            "host_unchanged": before == [_host_file(p) for p in files],
            "host_sha": before[0][-1],
            "other": [other["exit_code"], *other["stdout"].split()],
        }
    return e.usr_copy


def usr_write_stays_in_copy(v: Any, _e: Env) -> bool:
    return (
        v["changed"][:2] == [0, "CORRAL-COW"]
        and v["copy_tail"] == "CORRAL-COW"
        and v["host_unchanged"]
        and v["other"][:2] == [0, v["host_sha"]]
    )


def usr_chown_stays_in_copy(v: Any, _e: Env) -> bool:
    return (
        v["changed"][0] == 0
        and v["changed"][2] == "1:1"
        and v["copy_owner"] == v["expected_owner"]  # an unprivileged uid of its own block
        and v["host_unchanged"]
        and v["other"][2:3] == ["0:0"]
    )


def etc_write_stays_in_copy(v: Any, _e: Env) -> bool:
    return (
        v["changed"][0] == 0
        and v["changed"][3].startswith("corral-cow:")
        and v["host_unchanged"]
        and v["other"][3:] == ["0"]
    )


# The node's mount points in the sandbox's root (/.corral: the host's /usr for the supervisor,
# supervisor.py) are in its copy-on-write root, which lasts. Replaced by a link into the root's
# own /workspace directory, which the /workspace overlay then covers, they would make the next
# start bind the host's /usr there, out of sight, and run as the supervisor the loader planted
# at that path in /workspace. The sandbox's user owns /.corral/host; its root owns /.
HIJACKS = {
    "user": ("mv /.corral/host /.corral/host-x && ln -s ../workspace /.corral/host", HOST_MOUNT),
    "root": ("mv /.corral /.corral-x && ln -s workspace /.corral", "/.corral"),
}
HIJACK_MARK = "CORRAL-HIJACKED"


def host_supervisor_hijack(e: Env, user: str) -> Any:
    move, prefix = HIJACKS[user]
    planted = "/workspace" + TRUSTED_LOADER.removeprefix(prefix)
    plant = (
        f"set -e; {move}; mkdir -p {os.path.dirname(planted)}; "
        f"printf '#!/bin/sh\\necho {HIJACK_MARK} $(id -u) >&2\\n"
        f"echo {HIJACK_MARK} > /workspace/.hijacked\\nexit 1\\n' > {planted}; "
        f"chmod 755 {planted}"
    )
    sid = create_sandbox(e.api)
    try:
        made = exec_(e.api, sid, plant, user=user)
        assert made["exit_code"] == 0, made
        stop = e.api.post(f"/v1/sandboxes/{sid}/stop").status_code
        begin = e.api.post(f"/v1/sandboxes/{sid}/start")
        ran = exec_(e.api, sid, "echo ok")["stdout"] if begin.status_code == 200 else None
        mark = e.root_layout(sid).workspace_upper / ".hijacked"
        return {
            "stop": stop,
            "start": begin.status_code,
            "ran_in_supervisor": HIJACK_MARK in begin.text or mark.exists(),
            "commands_run": ran == "ok\n",
            "answer": begin.text[:300] if begin.status_code != 200 else None,
        }
    finally:
        delete_sandbox(e.api, sid)


def hijack_contained(v: Any, _e: Env) -> bool:
    return (
        v["stop"] == v["start"] == 200
        and v["ran_in_supervisor"] is False
        and v["commands_run"] is True
    )


def host_namespaced_sysctls(e: Env) -> Any:
    def host_values() -> dict[str, str]:
        return {k: Path("/proc/sys", k).read_text().strip() for k in NEW_SYSCTLS}

    script = "; ".join(
        f"echo {value} > /proc/sys/{key}; cat /proc/sys/{key}" for key, value in NEW_SYSCTLS.items()
    )
    before = host_values()
    with sandbox(e.api) as sid:
        inside = exec_(e.api, sid, script, user="root")["stdout"].split()
        after = host_values()
    return {
        "wanted": list(NEW_SYSCTLS.values()),
        "inside": inside,
        "host_before": before,
        "host_after": after,
    }


def _files_api(e: Env, sid: str) -> None:
    probe = e.api.get(f"/v1/sandboxes/{sid}/files/stat", params={"path": "/workspace"})
    if probe.status_code == 404 and "error" not in probe.json():
        pytest.skip("this server has no files API")


def host_files_api_links(e: Env) -> Any:
    """The files API (which works inside the sandbox) meets planted links."""
    files = "/v1/sandboxes/{}/files"
    with sandbox(e.api) as sid:
        _files_api(e, sid)
        assert exec_(e.api, sid, PLANT_LINKS.format(**e.ctx))["exit_code"] == 0
        before = e.snapshot()
        url = files.format(sid)
        reads = {
            p: e.api.get(url, params={"path": p})
            for p in ("/workspace/l-file", "/workspace/shadow", "/workspace/l-etc/shadow")
        }
        through_dir = e.api.put(url, params={"path": "/workspace/l-dir/pwned"}, content=b"x")
        onto_link = e.api.put(url, params={"path": "/workspace/l-file"}, content=b"pwned")
        removed = e.api.delete(url, params={"path": "/workspace/sub/deeper/l-d"})
        archive = e.api.get(f"/v1/sandboxes/{sid}/archive", params={"path": "/workspace"})
        members = {}
        if archive.status_code == 200:
            with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
                for m in tar.getmembers():
                    data = tar.extractfile(m).read() if m.isfile() else b""  # type: ignore[union-attr]
                    members[m.name] = (m.type.decode(), data)
        return {
            "host_read": [p for p, r in reads.items() if r.status_code == 200],
            "leaked": [
                p for p, r in reads.items() if b"canary" in r.content or b"root:" in r.content
            ],
            "write_through_dir": through_dir.status_code,
            "write_onto_link": onto_link.status_code,
            "delete_link": removed.status_code,
            "archive": archive.status_code,
            "archive_leaks": [n for n, (_, d) in members.items() if b"canary" in d],
            "l_dir_is_link": members.get("l-dir", ("?",))[0] == tarfile.SYMTYPE.decode(),
            "host_unchanged": before == e.snapshot(),
            "pwned_on_host": (e.canary / "pwned").exists(),
        }


def files_api_links_ok(v: Any, _e: Env) -> bool:
    return (
        v["host_read"] == []
        and v["leaked"] == []
        and v["write_through_dir"] >= 400
        and v["write_onto_link"] == 200  # replaces the link itself (documented)
        and v["delete_link"] == 204
        and v["archive"] == 200
        and v["archive_leaks"] == []
        and v["l_dir_is_link"]
        and v["host_unchanged"]
        and not v["pwned_on_host"]
    )


def host_archive_slip(e: Env) -> Any:
    """An uploaded archive that tries to write outside: through a symlink entry, `..`, an
    absolute name, a hard link to a host file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(
            name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b""
        ) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("evil", tarfile.SYMTYPE, link=str(e.canary))
        add("evil/pwned", data=b"through a symlink entry")
        add("../../../../../../.." + str(e.canary) + "/pwned", data=b"dot-dot")
        add(str(e.canary) + "/pwned", data=b"absolute")
        add("hard", tarfile.LNKTYPE, link="/etc/passwd")
        add("fifo", tarfile.FIFOTYPE)
    before = e.snapshot()
    with sandbox(e.api) as sid:
        _files_api(e, sid)
        resp = e.api.put(
            f"/v1/sandboxes/{sid}/archive",
            params={"path": "/workspace/up"},
            content=buf.getvalue(),
            headers={"content-type": "application/gzip"},
        )
        inside = exec_(e.api, sid, "ls -la /workspace/up 2>&1; true")["stdout"]
    return {
        "status": resp.status_code,
        "code": resp.json().get("error", {}).get("code") if resp.status_code >= 400 else None,
        "host_unchanged": before == e.snapshot(),
        "pwned_on_host": (e.canary / "pwned").exists(),
        "inside": inside,
    }


def private_dirs_ok(v: Any, e: Env) -> bool:
    uid = v["dir"][0]
    in_range = e.server.uid_base < uid < e.server.uid_base + UID_BLOCK
    [(at_disk, fstype, options)] = v["disk_mounts"]  # mounted once, at <id>/disk
    return (
        v["parent"] == (0, "0o711")
        and v["dir"][1] == "0o700"
        and in_range
        and v["image"][0] == 0  # the server's, inside the 0700 directory
        and v["disk_root_uid"] == uid
        and v["workspace_uid"] == uid
        and v["root_upper"] == v["usr_upper"] == (uid - SANDBOX_UID, "0o755")
        and v["work_dirs"] == [(0, "0o700")]
        and v["tmp"] == (uid, "0o1777")
        and v["setuid_file"] == (uid, "0o4755")  # its own uid: nothing to gain on the host
        and at_disk
        and fstype == "ext4"
        and {"nosuid", "nodev"} <= set(options)  # and the bit means nothing there
    )


# --- the table -------------------------------------------------------------------------------

PROBES: list[Probe] = [
    # privilege
    Probe(
        "priv.caps_zero",
        PRIVILEGE,
        "CapInh/CapPrm/CapEff/CapAmb all 0",
        lambda v, _e: len(v) == 4 and set(v.values()) == {"0" * 16},
        py=status_py("CapInh", "CapPrm", "CapEff", "CapAmb"),
    ),
    Probe(
        "priv.cap_bounding_zero",
        PRIVILEGE,
        "CapBnd 0 (nothing to regain)",
        is_({"CapBnd": "0" * 16}),
        py=status_py("CapBnd"),
    ),
    Probe(
        "priv.no_new_privs",
        PRIVILEGE,
        "NoNewPrivs 1",
        is_({"NoNewPrivs": "1"}),
        py=status_py("NoNewPrivs"),
    ),
    Probe(
        "priv.seccomp_filter",
        PRIVILEGE,
        "Seccomp 2 (filter mode)",
        is_({"Seccomp": "2"}),
        py=status_py("Seccomp"),
    ),
    Probe(
        "priv.uid_1000",
        PRIVILEGE,
        "uid/euid/gid/egid 1000, no other groups",
        lambda v, _e: v[:4] == [1000] * 4 and set(v[4]) <= {1000},
        py="result = [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()]",
    ),
    Probe(
        "priv.host_uid_unprivileged",
        PRIVILEGE,
        "uid 1000 (and every other uid inside) maps into the sandbox's own block of "
        "unprivileged host uids of the server's pool, never to host root (uid_map and gid_map)",
        lambda v, e: all(
            any(line[0] <= 1000 < line[0] + line[2] for line in m)
            and sum(line[2] for line in m) <= SLOT_UIDS
            and all(
                e.server.uid_base < line[1] and line[1] + line[2] <= e.server.uid_base + UID_BLOCK
                for line in m
            )
            for m in v
        ),
        py=(
            "result = [[list(map(int, l.split())) for l in open('/proc/self/' + f)]\n"
            "          for f in ('uid_map', 'gid_map')]"
        ),
    ),
    Probe(
        "priv.setuid_0",
        PRIVILEGE,
        "setuid(0) fails EPERM",
        is_("EPERM"),
        py="result = err(os.setuid, 0)",
    ),
    Probe(
        "priv.setgroups",
        PRIVILEGE,
        "setgroups([0]) fails EPERM",
        is_("EPERM"),
        py="result = err(os.setgroups, [0])",
    ),
    Probe(
        "priv.unshare_user_cli",
        PRIVILEGE,
        "`unshare -U` fails",
        ok_rc_nonzero,
        sh="unshare -U true",
    ),
    Probe(
        "priv.unshare_mount_cli",
        PRIVILEGE,
        "`unshare -m` fails",
        ok_rc_nonzero,
        sh="unshare -m true",
    ),
    Probe(
        "priv.unshare_root_cli",
        PRIVILEGE,
        "`unshare -r` (map root) fails",
        ok_rc_nonzero,
        sh="unshare -r id -u",
    ),
    Probe(
        "priv.clone_newuser",
        PRIVILEGE,
        "clone(CLONE_NEWUSER) via raw syscall fails EPERM (a plain fork works)",
        controlled("EPERM"),
        py=clone_py(0x10000000),
    ),
    Probe(
        "priv.all_mounts_nosuid",
        PRIVILEGE,
        "every mount is nosuid (setuid bits give nothing, with NoNewPrivs too)",
        is_([]),
        py=(
            "result = [l.split()[4] for l in open('/proc/self/mountinfo')\n"
            "          if 'nosuid' not in l.split()[5].split(',')]"
        ),
    ),
    # mounts and filesystem
    absent("fs.etc_shadow", "'/etc/shadow'", "/etc/shadow"),
    absent("fs.etc_gshadow", "'/etc/gshadow'", "/etc/gshadow"),
    absent("fs.etc_sudoers", "'/etc/sudoers'", "/etc/sudoers"),
    Probe(
        "fs.root_home",
        FILESYSTEM,
        "/root is the sandbox's own (a directory of its root file system, owned by its root, "
        "0700), not a bind of the host's /root: the user cannot list it",
        is_({"owner_mode": [0, "0o700"], "list": "EACCES", "own_fs": True, "host_fs": False}),
        py=OWN_DIR.format(path="/root"),
    ),
    Probe(
        "fs.home",
        FILESYSTEM,
        "/home is the sandbox's own and empty (the host's has entries), not the host's; the "
        "user cannot add to it",
        is_(
            {
                "owner_mode": [0, "0o755"],
                "list": [],
                "own_fs": True,
                "host_fs": False,
                "create": "EACCES",
            }
        ),
        py=OWN_DIR.format(path="/home") + "result['create'] = err(os.mkdir, '/home/corral-probe')",
    ),
    absent("fs.host_ssh", "'/etc/ssh'", "the host's ssh keys (/etc/ssh)"),
    absent("fs.var_lib", "'/var/lib'", "/var/lib"),
    absent("fs.run", "'/run'", "/run (host sockets)"),
    absent("fs.source_tree", "'/work'", "the source tree (/work)"),
    absent("fs.data_dir", "CTX['data_dir']", "the server's data dir"),
    absent("fs.admin_key", "CTX['data_dir'] + '/admin.key'", "the server's admin.key"),
    absent("fs.server_db", "CTX['data_dir'] + '/corral.db'", "the server's database"),
    Probe(
        "fs.usr_readonly",
        FILESYSTEM,
        "the user cannot create a file in /usr (the sandbox root's copy-on-write /usr: EACCES)",
        is_("EACCES", "EROFS"),
        py="result = err(os.open, '/usr/corral-probe', os.O_WRONLY | os.O_CREAT)",
    ),
    Probe(
        "fs.usr_bin_readonly",
        FILESYSTEM,
        "opening /usr/bin/bash for writing fails",
        is_("EROFS", "EACCES"),
        py="result = err(os.open, '/usr/bin/bash', os.O_WRONLY)",
    ),
    Probe(
        "fs.root_readonly",
        FILESYSTEM,
        "mkdir at / fails",
        is_("EROFS", "EACCES"),
        py="result = err(os.mkdir, '/corral-probe')",
    ),
    Probe(
        "fs.etc_readonly",
        FILESYSTEM,
        "opening /etc/passwd for writing fails",
        is_("EROFS", "EACCES"),
        py="result = err(os.open, '/etc/passwd', os.O_WRONLY)",
    ),
    Probe(
        "fs.mount_cli",
        FILESYSTEM,
        "setuid `mount -t tmpfs` fails",
        ok_rc_nonzero,
        sh="mount -t tmpfs none /tmp",
    ),
    Probe(
        "fs.umount_cli",
        FILESYSTEM,
        "`umount -l /workspace` fails",
        ok_rc_nonzero,
        sh="umount -l /workspace",
    ),
    Probe("fs.chroot_cli", FILESYSTEM, "`chroot / true` fails", ok_rc_nonzero, sh="chroot / true"),
    Probe(
        "fs.mknod_device",
        FILESYSTEM,
        "mknod of /dev/mem's device fails EPERM",
        is_("EPERM"),
        py="result = err(os.mknod, '/workspace/mem', 0o20600, os.makedev(1, 1))",
    ),
    Probe(
        "fs.dev_minimal",
        FILESYSTEM,
        "/dev holds only null zero full random urandom tty ptmx pts shm (no disks, no mem)",
        lambda v, _e: (
            set(v)
            <= {
                "null",
                "zero",
                "full",
                "random",
                "urandom",
                "tty",
                "ptmx",
                "pts",
                "shm",
                "stdin",
                "stdout",
                "stderr",
                "fd",
                "core",
            }
        ),
        py="result = sorted(os.listdir('/dev'))",
    ),
    Probe(
        "fs.hardlink_etc",
        FILESYSTEM,
        "hard-linking a bound host file into /workspace fails EXDEV",
        is_("EXDEV"),
        py="result = err(os.link, '/etc/passwd', '/workspace/hl-passwd')",
    ),
    Probe(
        "fs.mountinfo_host_paths",
        FILESYSTEM,
        "/proc/self/mountinfo names no host path: nothing of the data dir (nor its temp dir's "
        "name), and the binds from the host's root file system are of /usr and /etc only",
        is_([]),
        py=(
            "import os\n"
            "name = os.path.basename(CTX['data_dir'])\n"
            "host = '%d:%d' % (os.major(CTX['host_root_dev']), os.minor(CTX['host_root_dev']))\n"
            "result = []\n"
            "for l in open('/proc/self/mountinfo'):\n"
            "    f = l.split()\n"
            "    if name in l or (f[2] == host and f[3] != '/' and\n"
            "                     f[3].split('/')[1] not in ('usr', 'etc')):\n"
            "        result.append(l.strip())"
        ),
    ),
    # kernel surface
    *[
        Probe(f"kernel.{name}", KERNEL, f"{name} fails EPERM", is_("EPERM"), py=f"result = {call}")
        for name, call in DENIED_EPERM
    ],
    *[
        Probe(
            f"kernel.{name}", KERNEL, f"{name} fails ENOSYS", is_("ENOSYS"), py=f"result = {call}"
        )
        for name, call in DENIED_ENOSYS
    ],
    *[
        Probe(
            f"kernel.clone_{name}",
            KERNEL,
            f"clone(CLONE_{name.upper()}) fails EPERM (a plain fork works)",
            controlled("EPERM"),
            py=clone_py(flag),
        )
        for name, flag in CLONE_FLAGS.items()
        if name != "newuser"  # priv.clone_newuser
    ],
    Probe(
        "kernel.clone_newuser_high_bits",
        KERNEL,
        "clone(CLONE_NEWUSER | 1<<32) fails EPERM",
        controlled("EPERM"),
        py=clone_py(0x10000000 | 1 << 32),
    ),
    Probe(
        "kernel.open_by_handle_at",
        KERNEL,
        "open_by_handle_at (the 'shocker' escape: a forged handle of the host's root directory, "
        "on the host file system the sandbox sees (its /usr, read-only, for the supervisor), "
        "or through its own /usr) fails EPERM, and so does a real handle",
        is_(HANDLES_DENIED),
        py=OPEN_BY_HANDLE,
    ),
    Probe(
        "kernel.personality_addr_no_randomize",
        KERNEL,
        "personality(ADDR_NO_RANDOMIZE) EPERM",
        is_("EPERM"),
        py="result = sc(135, 0x0040000)",
    ),
    Probe(
        "kernel.personality_read_implies_exec",
        KERNEL,
        "personality(READ_IMPLIES_EXEC) EPERM",
        is_("EPERM"),
        py="result = sc(135, 0x0400000)",
    ),
    Probe(
        "kernel.personality_high_bits",
        KERNEL,
        "personality(ADDR_NO_RANDOMIZE | 1<<32) EPERM",
        is_("EPERM"),
        py="result = sc(135, 0x0040000 | 1 << 32)",
    ),
    Probe(
        "kernel.personality_query_allowed",
        KERNEL,
        "personality(0xffffffff) (query) and personality(0) still work",
        lambda v, _e: isinstance(v[0], int) and v[1] == v[0] and isinstance(v[1], int),
        py="result = [sc(135, 0xFFFFFFFF), sc(135, 0)]",
    ),
    Probe(
        "kernel.socket_vsock",
        KERNEL,
        "socket(AF_VSOCK) fails EAFNOSUPPORT",
        is_("EAFNOSUPPORT"),
        py="result = sc(41, 40, 1, 0)",
    ),
    Probe(
        "kernel.x32_keyctl",
        KERNEL,
        "keyctl through the x32 ABI (nr | 0x40000000) fails (EPERM, or ENOSYS without x32)",
        is_("EPERM", "ENOSYS"),
        py="result = sc(0x40000000 | 250, 0, -3, 1)",
    ),
    *[
        Probe(
            f"kernel.i386_{name}",
            KERNEL,
            f"{name} via int 0x80 (i386 entry) fails {expected}",
            controlled(expected),
            py=with_control(expr),
            i386=True,
        )
        for name, expr, expected in [
            ("keyctl", "int80(288, 0, 0xFFFFFFFD, 1)", "EPERM"),
            ("unshare", "int80(310, 0)", "EPERM"),
            ("clone_newuser", "int80(120, 0x10000000 | 17, 0, 0, 0)", "EPERM"),
            ("mount", "int80(21, 0, 0, 0, 0)", "EPERM"),
            ("bpf", "int80(357, 0, 0, 0)", "EPERM"),
            ("perf_event_open", "int80(336, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF)", "EPERM"),
            ("userfaultfd", "int80(374, 1)", "EPERM"),
            ("io_uring_setup", "int80(425, 1, 0)", "EPERM"),
            ("personality", "int80(136, 0x0040000)", "EPERM"),
            ("clone3", "int80(435, 0, 0)", "ENOSYS"),
            ("socket_vsock", "int80(359, 40, 1, 0)", "EAFNOSUPPORT"),
            (
                "socketcall_vsock",
                "int80(102, 1, low_data(struct.pack('<III', 40, 1, 0)))",
                "EAFNOSUPPORT",
            ),
        ]
    ],
    # /proc and /sys
    Probe(
        "proc.sysctl_writes",
        PROCSYS,
        f"writing any of {len(SYSCTL_WRITES)} sysctls under /proc/sys fails",
        lambda v, _e: len(v) == len(SYSCTL_WRITES) and None not in v.values(),
        py=(
            "def w(p):\n"
            "    fd = os.open('/proc/sys/' + p, os.O_WRONLY)\n"
            "    try:\n"
            "        os.write(fd, open('/proc/sys/' + p, 'rb').read())\n"  # its own value
            "    finally:\n"
            "        os.close(fd)\n"
            f"result = {{p: err(w, p) for p in {SYSCTL_WRITES!r}}}"
        ),
    ),
    Probe(
        "proc.sysctl_write_sweep",
        PROCSYS,
        "no file under /proc/sys takes a write (each that opens gets its own value back)",
        lambda v, _e: v["written"] == [] and v["seen"] > 100,
        py=SYSCTL_SWEEP,
    ),
    Probe(
        "proc.sysrq_trigger",
        PROCSYS,
        "/proc/sysrq-trigger does not open for writing",
        lambda v, _e: v is not None,
        py="result = err(os.open, '/proc/sysrq-trigger', os.O_WRONLY)",
    ),
    Probe(
        "proc.only_own_pids",
        PROCSYS,
        "only the sandbox's own processes are visible (bwrap as pid 1, the supervisor, this)",
        lambda v, _e: (
            len(v) <= 6
            and v.get("1", [""])[0] == "bwrap"
            and all(
                a and a[0] in ("bwrap", "/usr/bin/python3", "python3", TRUSTED_LOADER)
                for a in v.values()
            )
        ),
        py=(
            "result = {}\n"
            "for p in os.listdir('/proc'):\n"
            "    if p.isdigit():\n"
            "        with open('/proc/%s/cmdline' % p, 'rb') as f:\n"
            "            result[p] = [a.decode() for a in f.read().split(b'\\0') if a]"
        ),
    ),
    Probe(
        "proc.pid1_cmdline",
        PROCSYS,
        "/proc/1/cmdline holds no secret, CORRAL_ setting or host path",
        no_secrets,
        py="result = open('/proc/1/cmdline', 'rb').read().decode(errors='replace')",
    ),
    Probe(
        "proc.environ_no_secrets",
        PROCSYS,
        "no readable /proc/*/environ or cmdline holds the admin key, CORRAL_, host paths",
        lambda v, e: no_secrets(v, e) and "PATH=" in v,
        py=(
            "parts = []\n"
            "for p in os.listdir('/proc'):\n"
            "    for f in ('environ', 'cmdline'):\n"
            "        try:\n"
            "            parts.append(open('/proc/%s/%s' % (p, f), 'rb').read())\n"
            "        except OSError:\n"
            "            pass\n"
            "result = b'\\n'.join(parts).replace(b'\\0', b'\\n').decode(errors='replace')"
        ),
    ),
    Probe(
        "proc.sys_absent_or_ro",
        PROCSYS,
        "/sys is absent (or every mount under it read-only)",
        lambda v, _e: v["exists"] is False or (v["mounts"] and all(v["mounts"])),
        py=(
            "result = {'exists': os.path.lexists('/sys'), 'mounts': [\n"
            "    'ro' in l.split()[5].split(',') for l in open('/proc/self/mountinfo')\n"
            "    if l.split()[4].startswith('/sys')]}"
        ),
    ),
    Probe(
        "proc.no_cgroupfs",
        PROCSYS,
        "no cgroup filesystem is mounted (no release_agent, no limits to raise)",
        is_([]),
        py=(
            "result = [l for l in open('/proc/self/mountinfo')\n"
            "          if l.split(' - ')[1].split()[0] in ('cgroup', 'cgroup2')]"
        ),
    ),
    Probe(
        "proc.kallsyms_hidden",
        PROCSYS,
        "/proc/kallsyms shows no kernel addresses",
        lambda v, _e: v == [] or set(v) == {"0" * 16},
        py=(
            "try:\n"
            "    result = [l.split()[0] for l in open('/proc/kallsyms').readlines()[:200]]\n"
            "except OSError:\n"
            "    result = []"
        ),
    ),
    # tty injection
    Probe(
        "tty.tiocsti_ctty",
        TTY,
        "TIOCSTI on its own controlling pty fails EPERM, nothing queued",
        tty_denied,
        py=tty_py("sc(16, s, 0x5412, b'\\n')"),
    ),
    Probe(
        "tty.tiocsti_high_bits",
        TTY,
        "TIOCSTI with bit 32 set in the request fails EPERM (CVE-2019-10063)",
        tty_denied,
        py=tty_py("sc(16, s, 0x100005412, b'\\n')"),
    ),
    Probe(
        "tty.tiocsti_all_high_bits",
        TTY,
        "TIOCSTI with all upper 32 bits set fails EPERM",
        tty_denied,
        py=tty_py("sc(16, s, 0xFFFFFFFF00005412, b'\\n')"),
    ),
    Probe(
        "tty.tioclinux",
        TTY,
        "TIOCLINUX fails EPERM",
        tty_denied,
        py=tty_py("sc(16, s, 0x541C, ctypes.create_string_buffer(b'\\x02' + b'\\0' * 31))"),
    ),
    Probe(
        "tty.tioclinux_high_bits",
        TTY,
        "TIOCLINUX with bit 32 set fails EPERM",
        tty_denied,
        py=tty_py("sc(16, s, 0x10000541C, ctypes.create_string_buffer(b'\\x02' + b'\\0' * 31))"),
    ),
    Probe(
        "tty.i386_tiocsti",
        TTY,
        "TIOCSTI via int 0x80 fails EPERM",
        lambda v, e: v["i386"] is True and tty_denied(v, e),
        py=tty_py("int80(54, s, 0x5412, low_data(b'\\n'))").replace(
            "result = {", "result = {'i386': int80(20) == os.getpid(), "
        ),
        i386=True,
    ),
    Probe(
        "tty.tiocsti_stdin",
        TTY,
        "TIOCSTI on the command's stdin fails EPERM",
        is_("EPERM"),
        py="result = sc(16, 0, 0x5412, b'\\n')",
    ),
    Probe(
        "tty.command_new_session",
        TTY,
        "a command leads its own session",
        lambda v, _e: v[0] == v[1],
        py="result = [os.getsid(0), CTX['runner_pid']]",
    ),
    Probe(
        "tty.no_controlling_tty",
        TTY,
        "opening /dev/tty fails ENXIO (no controlling tty)",
        is_("ENXIO"),
        py="result = err(os.open, '/dev/tty', os.O_RDWR)",
    ),
    Probe(
        "tty.bwrap_new_session",
        TTY,
        "bwrap's pid 1 and the supervisor lead a session of their own (--new-session)",
        is_([1, 1]),
        py=(
            "result = [int(open('/proc/%d/stat' % p).read().rsplit(')', 1)[1].split()[3])\n"
            "          for p in (1, supervisor_pid())]"
        ),
    ),
    # inherited descriptors
    Probe(
        "fds.only_stdio",
        FDS,
        "a command starts with descriptors 0, 1, 2 only",
        is_([0, 1, 2]),
        py="result = CTX['start_fds']",
    ),
    Probe(
        "fds.stdio_pipes",
        FDS,
        "0, 1, 2 are pipes (no socket to anything)",
        lambda v, _e: v == {"0": "fifo", "1": "fifo", "2": "fifo"},
        py="result = CTX['start_kinds']",
    ),
    Probe(
        "fds.bash_command",
        FDS,
        "a shell-string command (bash) has only 0, 1, 2",
        is_(["0", "1", "2"]),
        host=host_bash_fds,
    ),
    Probe(
        "fds.supervisor_fd_dir",
        FDS,
        "the supervisor's /proc/PID/fd cannot be listed",
        is_("EACCES", "EPERM"),
        py="result = err(os.listdir, '/proc/%d/fd' % supervisor_pid())",
    ),
    Probe(
        "fds.supervisor_socket_open",
        FDS,
        "the supervisor's socket cannot be opened through /proc/PID/fd",
        is_("EACCES", "EPERM"),
        py=OPEN_SUPERVISOR_SOCKET,
    ),
    Probe(
        "fds.supervisor_pidfd_getfd",
        FDS,
        "pidfd_getfd of the supervisor's socket fails EPERM",
        is_("EPERM"),
        py=(
            "sup = supervisor_pid()\n"
            "fd = int(open('/proc/%d/cmdline' % sup, 'rb').read().split(b'\\0')[-2])\n"
            "result = sc(438, os.pidfd_open(sup), fd, 0)"
        ),
    ),
    Probe(
        "fds.supervisor_ptrace",
        FDS,
        "PTRACE_ATTACH to the supervisor fails EPERM",
        is_("EPERM"),
        py=PTRACE_SUPERVISOR,
    ),
    Probe(
        "fds.supervisor_vm_readv",
        FDS,
        "process_vm_readv of the supervisor's memory fails EPERM",
        is_("EPERM"),
        py=(
            "buf = ctypes.create_string_buffer(64)\n"
            "local = struct.pack('QQ', ctypes.addressof(buf), 64)\n"
            "remote = struct.pack('QQ', 0x400000, 64)\n"
            "result = sc(310, supervisor_pid(), local, 1, remote, 1, 0)"
        ),
    ),
    # network
    Probe(
        "net.only_loopback",
        NETWORK,
        "the only interface is lo",
        is_(["lo"]),
        py="result = [l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]]",
    ),
    Probe(
        "net.no_routes",
        NETWORK,
        "no IPv4 route, no IPv6 route but through lo",
        lambda v, _e: v["v4"] == [] and set(v["v6"]) <= {"lo"},
        py=(
            "result = {'v4': open('/proc/net/route').readlines()[1:], 'v6': [\n"
            "    l.split()[-1] for l in open('/proc/net/ipv6_route')]}"
        ),
    ),
    Probe(
        "net.host_tcp_loopback",
        NETWORK,
        "a TCP service the test runs on the host's 127.0.0.1 is unreachable",
        not_connected,
        py="result = connect_err(socket.AF_INET, ('127.0.0.1', CTX['tcp_port']))",
    ),
    Probe(
        "net.host_tcp_loopback6",
        NETWORK,
        "a TCP service the test runs on the host's ::1 is unreachable",
        not_connected,
        py="result = connect_err(socket.AF_INET6, ('::1', CTX['tcp6_port']))",
        requires="tcp6_port",
    ),
    Probe(
        "net.corral_api",
        NETWORK,
        "the Corral API on the host's loopback is unreachable",
        not_connected,
        py="result = connect_err(socket.AF_INET, ('127.0.0.1', CTX['server_port']))",
    ),
    Probe(
        "net.host_abstract_unix",
        NETWORK,
        "an abstract unix socket the test opens on the host is unreachable",
        not_connected,
        py="result = connect_err(socket.AF_UNIX, '\\0' + CTX['abstract'])",
    ),
    Probe(
        "net.host_address",
        NETWORK,
        "a TCP service on the host's own (non-loopback) address is unreachable: ENETUNREACH",
        is_("ENETUNREACH"),
        py="result = connect_err(socket.AF_INET, (CTX['host_ip'], CTX['host_ip_port']))",
        requires="host_ip",
    ),
    Probe(
        "net.metadata",
        NETWORK,
        "169.254.169.254 (cloud metadata): ENETUNREACH",
        is_("ENETUNREACH"),
        py="result = connect_err(socket.AF_INET, ('169.254.169.254', 80))",
    ),
    Probe(
        "net.public",
        NETWORK,
        "a public address: ENETUNREACH",
        is_("ENETUNREACH"),
        py="result = connect_err(socket.AF_INET, ('1.1.1.1', 443))",
    ),
    Probe(
        "net.udp_out",
        NETWORK,
        "a UDP datagram out: ENETUNREACH",
        is_("ENETUNREACH"),
        py="result = err(socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto, b'x', "
        "('8.8.8.8', 53))",
    ),
    Probe(
        "net.packet_socket",
        NETWORK,
        "socket(AF_PACKET, SOCK_RAW) fails EPERM",
        is_("EPERM"),
        py="result = err(socket.socket, socket.AF_PACKET, socket.SOCK_RAW)",
    ),
    Probe(
        "net.raw_socket",
        NETWORK,
        "socket(AF_INET, SOCK_RAW) fails EPERM",
        is_("EPERM"),
        py="result = err(socket.socket, socket.AF_INET, socket.SOCK_RAW, 1)",
    ),
    Probe(
        "net.configure",
        NETWORK,
        "`ip addr add` fails",
        ok_rc_nonzero,
        sh="ip addr add 10.9.9.9/32 dev lo",
    ),
    # cross-sandbox: value {"a": in the sandbox that made the state, "b": in another}
    *[
        Probe(
            f"cross.{name}",
            CROSS,
            f"{what} of one sandbox is not seen by another",
            cross_found,
            py=f"result = {expr}",
            cross=True,
        )
        for name, what, expr in [
            ("workspace_file", "a file in /workspace", "os.path.exists('/workspace/xs-marker')"),
            ("tmp_file", "a file in /tmp", "os.path.exists('/tmp/xs-marker')"),
            ("dev_shm_file", "a file in /dev/shm", "os.path.exists('/dev/shm/xs-marker')"),
            ("sysv_shm", "a SysV shm segment (fixed key)", f"libc.shmget({XS_KEY}, 0, 0) >= 0"),
            ("sysv_msg", "a SysV message queue (fixed key)", f"libc.msgget({XS_KEY}, 0) >= 0"),
            ("sysv_sem", "a SysV semaphore set (fixed key)", f"libc.semget({XS_KEY}, 0, 0) >= 0"),
            ("posix_mq", "a POSIX message queue", "libc.mq_open(b'/corral-xs', os.O_RDONLY) >= 0"),
            ("flock_tmp", "a flock on /tmp/xs-lock", "locked('/tmp/xs-lock')"),
            ("flock_workspace", "a flock on /workspace/xs-lock", "locked('/workspace/xs-lock')"),
            ("flock_dev_shm", "a flock on /dev/shm/xs-lock", "locked('/dev/shm/xs-lock')"),
            (
                "abstract_socket",
                "an abstract unix socket",
                "connect_err(socket.AF_UNIX, '\\0corral-xs') is None",
            ),
            (
                "loopback_tcp",
                "a TCP listener on 127.0.0.1",
                f"connect_err(socket.AF_INET, ('127.0.0.1', {XS_PORT})) is None",
            ),
            (
                "processes",
                "a process",
                "any(b'corral-xs-holder' in open('/proc/%s/cmdline' % p, 'rb').read()\n"
                "    for p in os.listdir('/proc') if p.isdigit())",
            ),
        ]
    ],
    Probe(
        "cross.keyrings",
        CROSS,
        "keyrings are denied in both sandboxes (nothing to share)",
        lambda v, _e: v == {"a": "EPERM", "b": "EPERM"},
        py="result = sc(250, 0, -3, 1)",
        cross=True,
    ),
    Probe(
        "cross.distinct_host_uids",
        CROSS,
        "two sandboxes run as different host uids",
        lambda v, _e: v["a"] != v["b"] and min(v.values()) > 0,
        py="result = int(open('/proc/self/uid_map').read().split()[1])",
        cross=True,
    ),
    # resources (the heavy ones are in test_limits.py)
    Probe(
        "res.core_dumps_off",
        RESOURCES,
        "RLIMIT_CORE is 0",
        is_([0, 0]),
        py="import resource\nresult = list(resource.getrlimit(resource.RLIMIT_CORE))",
    ),
    Probe(
        "res.oom_score_adj",
        RESOURCES,
        "a command cannot lower its oom_score_adj (cannot shield itself from the OOM killer)",
        lambda v, _e: v is not None,
        py=(
            "def w():\n"
            "    with open('/proc/self/oom_score_adj', 'w') as f:\n"
            "        f.write('-1000')\n"
            "result = err(w)"
        ),
    ),
    Probe(
        "res.tmpfs_sizes",
        RESOURCES,
        "/dev/shm is a 64 MiB tmpfs; /tmp is on the sandbox's own disk (ext4, of the default "
        "10 GiB), not a tmpfs; /workspace, /usr (with /usr/local) and / are overlays written "
        "to that disk: the same figures, and 16 MiB written to /workspace are taken from it",
        lambda v, _e: (
            v["/dev/shm"][:2] == ["tmpfs", 64 << 20]
            and v["/tmp"][0] == "ext4"
            and 0.95 * DEFAULT_DISK < v["/tmp"][1] <= DEFAULT_DISK
            and v["/workspace"][0] == v["/usr"][0] == v["/"][0] == "overlay"
            and v["/usr/local"][0] is None  # part of /usr
            and all(v[p][1:] == v["/tmp"][1:] for p in ("/workspace", "/usr", "/usr/local", "/"))
            and v["taken"] >= 16 << 20
        ),
        py=(
            FS_FIGURES + "types = {l.split()[4]: l.split(' - ')[1].split()[0]\n"
            "         for l in open('/proc/self/mountinfo')}\n"
            "result = {p: [types.get(p), *figures(p)]\n"
            "          for p in ('/tmp', '/dev/shm', '/workspace', '/usr', '/usr/local', '/')}\n"
            "free = os.statvfs('/tmp').f_bfree\n"
            "with open('/workspace/.corral-fill', 'wb') as f:\n"
            "    f.write(b'x' * (16 << 20))\n"
            "    os.fsync(f.fileno())\n"
            "result['taken'] = (free - os.statvfs('/tmp').f_bfree) * os.statvfs('/tmp').f_frsize\n"
            "os.unlink('/workspace/.corral-fill')"
        ),
    ),
    Probe(
        "res.pids_cap",
        RESOURCES,
        "with pids=16, forking stops with EAGAIN below 16",
        lambda v, _e: v["error"] == "EAGAIN" and v["forked"] < 16,
        host=host_pids_cap,
    ),
    Probe(
        "res.memory_cap",
        RESOURCES,
        "with memory_mb=32, a 256 MiB allocation is OOM-killed: 137, oom_killed",
        lambda v, _e: v["exit_code"] == 137 and v["oom_killed"] is True,
        host=host_memory_cap,
    ),
    Probe(
        "res.timeout_kills_daemons",
        RESOURCES,
        "after a timeout, no setsid/nohup/TERM-proof process of the command is left",
        lambda v, _e: v == {"status": "timed_out", "left": []},
        host=host_timeout_kills_daemons,
    ),
    Probe(
        "res.delete_kills_background",
        RESOURCES,
        "deleting a sandbox leaves no process of it (setsid background included)",
        lambda v, _e: v["seen"] and v["status"] == 200 and v["left"] == v["uid_left"] == [],
        host=host_delete_kills_background,
    ),
    Probe(
        "res.workspace_disk_mb",
        RESOURCES,
        "with disk_mb=64, /workspace cannot take 256 MiB",
        lambda v, _e: v["rc"] != 0,
        host=host_workspace_disk,
    ),
    Probe(
        "res.default_workspace_bounded",
        RESOURCES,
        "a sandbox created with defaults writes /workspace (and /tmp, /usr, /) to one bounded "
        "file system of its own (CORRAL_DEFAULT_DISK_MB, 10 GiB), not to the host's (which it "
        "could fill): reserving 11 GiB fails ENOSPC, for the user in /workspace and for its "
        "root in /usr and /root",
        default_workspace_ok,
        host=lambda e: host_default_workspace(e),
    ),
    Probe(
        "res.disk_image_released",
        RESOURCES,
        "deleting a sandbox with disk_mb leaves no mount and no loop device of its image",
        lambda v, _e: v["mounted_while_alive"] and v["mounts_after"] == v["loops_after"] == [],
        host=lambda e: host_disk_released(e),
    ),
    # the sandbox's own root (sudo): uid 0 of its user namespace, nothing more
    Probe(
        "root.identity",
        PRIVILEGE,
        "sudo runs as uid 0 inside, mapped to an unprivileged host uid of the pool",
        lambda v, e: (
            v["uid"] == 0
            and all(
                e.server.uid_base < line[1] < e.server.uid_base + UID_BLOCK for line in v["map"]
            )
        ),
        py=(
            "result = {'uid': os.getuid(),\n"
            "          'map': [list(map(int, l.split())) for l in open('/proc/self/uid_map')]}"
        ),
        user="root",
    ),
    Probe(
        "root.caps_limited",
        PRIVILEGE,
        "root inside holds no capability beyond CHOWN, DAC_OVERRIDE, FOWNER, SETGID, SETUID, "
        "SETPCAP (no SYS_ADMIN, NET_ADMIN, SYS_PTRACE, MKNOD, DAC_READ_SEARCH, ...) in any set",
        lambda v, _e: len(v) == 5 and all(int(x, 16) & ~ROOT_CAPS == 0 for x in v.values()),
        py=status_py("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"),
        user="root",
    ),
    Probe(
        "root.nnp_seccomp",
        PRIVILEGE,
        "root inside: NoNewPrivs 1, Seccomp 2",
        is_({"NoNewPrivs": "1", "Seccomp": "2"}),
        py=status_py("NoNewPrivs", "Seccomp"),
        user="root",
    ),
    Probe(
        "root.setuid_unmapped",
        PRIVILEGE,
        "root inside cannot become a uid outside its map (EINVAL)",
        is_("EINVAL"),
        py="result = err(os.setuid, 4242)",
        user="root",
    ),
    Probe(
        "root.unshare_user_cli",
        PRIVILEGE,
        "root inside: `unshare -U` fails",
        ok_rc_nonzero,
        sh="unshare -U true",
        user="root",
    ),
    Probe(
        "priv.supervisor_mount_points",
        PRIVILEGE,
        "the user replacing /.corral/host (its own directory) with a link into /workspace and "
        "planting a loader there: after a restart the supervisor is still the host's (the "
        "sandbox starts, commands run, the planted loader never runs)",
        hijack_contained,
        host=lambda e: host_supervisor_hijack(e, "user"),
    ),
    Probe(
        "root.supervisor_mount_points",
        PRIVILEGE,
        "root inside replacing /.corral with a link into /workspace and planting a loader "
        "there: after a restart the supervisor is still the host's",
        hijack_contained,
        host=lambda e: host_supervisor_hijack(e, "root"),
    ),
    Probe(
        "root.etc_shadow",
        FILESYSTEM,
        "root inside sees no /etc/shadow",
        is_(False),
        py="result = os.path.lexists('/etc/shadow')",
        user="root",
    ),
    Probe(
        "root.usr_bin_own_copy",
        FILESYSTEM,
        "root inside writing /usr/bin/bash changes only its own copy (in its /usr's writable "
        "layer): the host's /usr/bin/bash is unchanged and another sandbox sees the host's",
        usr_write_stays_in_copy,
        host=host_usr_copy,
    ),
    Probe(
        "root.chown_host_file",
        FILESYSTEM,
        "root inside chowning /usr/bin/bash changes only its copy, owned on the host by an "
        "unprivileged uid of its block; the host's file keeps its owner, another sandbox sees it",
        usr_chown_stays_in_copy,
        host=host_usr_copy,
    ),
    Probe(
        "root.etc_own_copy",
        FILESYSTEM,
        "root inside adding a user to /etc/passwd changes only its copy: the host's "
        "/etc/passwd is unchanged and another sandbox does not see the user",
        etc_write_stays_in_copy,
        host=host_usr_copy,
    ),
    Probe(
        "root.root_home_own",
        FILESYSTEM,
        "root inside finds /root and /home its own and empty (the host's have entries); what "
        "it writes there is in them, not in the host's",
        lambda v, _e: (
            v
            == {
                "root": [],
                "home": [],
                "wrote": None,
                "own_fs": True,
                "after": [["corral-probe-root-home"], ["corral-probe-root-home"]],
            }
            and not os.path.lexists("/root/corral-probe-root-home")
            and not os.path.lexists("/home/corral-probe-root-home")
        ),
        py=(
            "result = {'root': sorted(os.listdir('/root')), 'home': sorted(os.listdir('/home')),\n"
            "          'own_fs': os.stat('/root').st_dev == os.stat('/').st_dev}\n"
            "def write():\n"
            "    for d in ('/root', '/home'):\n"
            "        open(d + '/corral-probe-root-home', 'w').write('x')\n"
            "result['wrote'] = err(write)\n"
            "result['after'] = [sorted(os.listdir(d)) for d in ('/root', '/home')]\n"
            "for d in ('/root', '/home'):\n"  # leave them as they were for the user's probes
            "    err(os.unlink, d + '/corral-probe-root-home')"
        ),
        user="root",
    ),
    Probe(
        "root.mknod_device",
        FILESYSTEM,
        "root inside cannot mknod a device (no CAP_MKNOD)",
        is_("EPERM"),
        py="result = err(os.mknod, '/workspace/root-mem', 0o20600, os.makedev(1, 1))",
        user="root",
    ),
    Probe(
        "root.mount_cli",
        FILESYSTEM,
        "root inside: `mount -t tmpfs` fails",
        ok_rc_nonzero,
        sh="mount -t tmpfs none /tmp",
        user="root",
    ),
    *[
        Probe(
            f"root.{name}",
            KERNEL,
            f"root inside: {name} fails EPERM",
            is_("EPERM"),
            py=f"result = {call}",
            user="root",
        )
        for name, call in DENIED_EPERM
        if name
        in (
            "keyctl",
            "bpf",
            "mount",
            "unshare_newuser",
            "setns",
            "init_module",
            "perf_event_open",
            "io_uring_setup",
            "chroot",
            "pivot_root",
        )
    ],
    Probe(
        "root.clone_newuser",
        KERNEL,
        "root inside: clone(CLONE_NEWUSER) fails EPERM",
        controlled("EPERM"),
        py=clone_py(0x10000000),
        user="root",
    ),
    Probe(
        "root.open_by_handle_at",
        KERNEL,
        "root inside: open_by_handle_at of a forged host-root handle (or a real one) fails EPERM",
        is_(HANDLES_DENIED),
        py=OPEN_BY_HANDLE,
        user="root",
    ),
    Probe(
        "root.sysctl_write_sweep",
        PROCSYS,
        "root inside: no host-wide sysctl takes a write (only those of its own IPC/pid/UTS/net "
        "namespaces may)",
        lambda v, _e: (
            v["seen"] > 100
            and all(
                p.removeprefix("/proc/sys/").startswith(NAMESPACED_SYSCTLS) for p in v["written"]
            )
        ),
        py=SYSCTL_SWEEP,
        user="root",
    ),
    Probe(
        "root.namespaced_sysctls_stay_inside",
        PROCSYS,
        "root inside changing its own namespaces' sysctls (shmmax, msgmax, mqueue, pid_max) "
        "leaves the host's values unchanged",
        lambda v, _e: v["inside"] == v["wanted"] and v["host_before"] == v["host_after"],
        host=lambda e: host_namespaced_sysctls(e),
    ),
    Probe(
        "root.tiocsti_ctty",
        TTY,
        "root inside: TIOCSTI on its controlling pty fails EPERM",
        tty_denied,
        py=tty_py("sc(16, s, 0x5412, b'\\n')"),
        user="root",
    ),
    Probe(
        "root.supervisor_ptrace",
        FDS,
        "root inside: PTRACE_ATTACH to the supervisor fails EPERM",
        is_("EPERM"),
        py=PTRACE_SUPERVISOR,
        user="root",
    ),
    Probe(
        "root.supervisor_socket_open",
        FDS,
        "root inside cannot open the supervisor's socket through /proc/PID/fd",
        is_("EACCES", "EPERM"),
        py=OPEN_SUPERVISOR_SOCKET,
        user="root",
    ),
    Probe(
        "root.raw_socket",
        NETWORK,
        "root inside: socket(AF_INET, SOCK_RAW) fails EPERM",
        is_("EPERM"),
        py="result = err(socket.socket, socket.AF_INET, socket.SOCK_RAW, 1)",
        user="root",
    ),
    Probe(
        "root.configure_net",
        NETWORK,
        "root inside: `ip addr add` fails",
        ok_rc_nonzero,
        sh="ip addr add 10.9.9.9/32 dev lo",
        user="root",
    ),
    Probe(
        "root.host_tcp_loopback",
        NETWORK,
        "root inside: the host's 127.0.0.1 service is unreachable",
        not_connected,
        py="result = connect_err(socket.AF_INET, ('127.0.0.1', CTX['tcp_port']))",
        user="root",
    ),
    Probe(
        "hf.root_files_unprivileged",
        HOSTFILES,
        "files root inside makes (setuid root-inside, in /workspace, /usr/local, /root and "
        "/etc, and its setuid copy of /usr/bin/bash) belong on the host to an unprivileged "
        "uid of the pool",
        lambda v, e: all(e.server.uid_base < uid < e.server.uid_base + UID_BLOCK for uid in v),
        host=lambda e: host_root_files(e),
    ),
    # host-side file handling
    Probe(
        "hf.symlinks_on_delete",
        HOSTFILES,
        "delete removes the sandbox's files without following planted symlinks (to a host "
        "canary, /etc/shadow, /etc, the data dir, /): host files unchanged, server healthy",
        is_({"status": 200, "removed": True, "host_unchanged": True, "server_healthy": True}),
        host=host_symlinks_on_delete,
    ),
    Probe(
        "hf.hardlinks",
        HOSTFILES,
        "a hard link to a host file cannot be made (invisible: ENOENT; bound: EXDEV)",
        is_(
            {
                "canary": "ENOENT",
                "etc": "EXDEV",
                "usr": "EXDEV",
                "proc": "EXDEV",
                "status": 200,
                "host_unchanged": True,
            }
        ),
        host=host_hardlinks,
    ),
    Probe(
        "hf.fifos_on_delete",
        HOSTFILES,
        "delete with FIFOs named like files (and blocked readers/writers) and a socket file "
        "completes promptly (under 30 s: a hang would block it for good) and removes everything",
        lambda v, _e: v["status"] == 200 and v["removed"] and v["seconds"] < 30,
        host=host_fifos_on_delete,
    ),
    Probe(
        "hf.stop_start",
        HOSTFILES,
        "stop and start of a sandbox with planted links change nothing on the host",
        is_({"stop": 200, "start": 200, "host_unchanged": True, "links_kept": True}),
        host=host_stop_start,
    ),
    Probe(
        "hf.private_dirs",
        HOSTFILES,
        "the sandbox's host dir is 0700 and its files (a setuid copy of bash included) belong "
        "to its unprivileged uids (the writable layers of / and /usr to its root's, of "
        "/workspace to its user's; the overlays' work dirs are host root's, 0700); sandboxes/ "
        "is 0711 root",
        private_dirs_ok,
        host=host_private_dirs,
    ),
    Probe(
        "hf.files_api_links",
        HOSTFILES,
        "the files API never follows planted links to the host: reads of links to a host "
        "canary or /etc/shadow fail, writes through a linked dir fail, a write onto a link "
        "replaces the link, an archive download stores links as links; host unchanged",
        files_api_links_ok,
        host=host_files_api_links,
    ),
    Probe(
        "hf.archive_slip",
        HOSTFILES,
        "an uploaded archive writing through a symlink entry, `..`, an absolute name or a "
        "hard link to /etc/passwd is refused (400 unsafe_archive) and the host is unchanged",
        lambda v, _e: (
            v["status"] == 400
            and v["code"] == "unsafe_archive"
            and v["host_unchanged"]
            and not v["pwned_on_host"]
        ),
        host=host_archive_slip,
    ),
    Probe(
        "hf.tmp_cleared_on_start",
        HOSTFILES,
        "the start that empties /tmp (on the sandbox's disk) removes planted links to the host, "
        "a FIFO and a 2000-deep tree without following them; /workspace is kept; host unchanged",
        is_(
            {
                "stop": 200,
                "start": 200,
                "tmp_left": [],
                "workspace_kept": True,
                "host_unchanged": True,
                "canary_intact": True,
            }
        ),
        host=host_tmp_cleared,
    ),
    Probe(
        "hf.deep_tree_delete",
        HOSTFILES,
        "delete removes a 2000-deep directory tree the sandbox made",
        is_({"status": 200, "removed": True}),
        host=host_deep_tree,
    ),
]

PRELUDE_EXTRA = r"""
import fcntl

def connect_err(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(addr)
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        s.close()
    return None

def locked(path):
    '''True if someone else holds a lock on path.'''
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False

libc.mq_open.restype = ctypes.c_int
"""

XS_SETUP = f"""
set -e
echo a > /workspace/xs-marker; echo a > /tmp/xs-marker; echo a > /dev/shm/xs-marker
python3 -c '
import ctypes, os
l = ctypes.CDLL(None, use_errno=True)
ids = [l.shmget({XS_KEY}, 4096, 0o1666), l.msgget({XS_KEY}, 0o1666), l.semget({XS_KEY}, 1, 0o1666)]
mq = l.mq_open(b"/corral-xs", os.O_CREAT | os.O_RDWR, 0o666, None)
assert min(ids) >= 0 and mq >= 0, (ids, mq, ctypes.get_errno())
'
"""

XS_HOLDER = f"""
import fcntl, socket, time
held = []
for p in ("/tmp/xs-lock", "/workspace/xs-lock", "/dev/shm/xs-lock"):
    f = open(p, "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    held.append(f)
u = socket.socket(socket.AF_UNIX)
u.bind("\\0corral-xs")
u.listen()
t = socket.socket()
t.bind(("127.0.0.1", {XS_PORT}))
t.listen()
time.sleep(120)
"""


# --- the environment the probes run in -------------------------------------------------------


class Env:
    """The dedicated server, the host-side services and canaries, and the batched results."""

    def __init__(self, server: Server, api: httpx.Client) -> None:
        self.server = server
        self.api = api
        self._closers: list[Callable[[], None]] = []
        self.canary = Path(tempfile.mkdtemp(prefix="corral-canary-", dir="/tmp"))
        self._closers.append(lambda: shutil.rmtree(self.canary, ignore_errors=True))
        self.canary.chmod(0o755)
        (self.canary / "secret").write_text("canary")
        (self.canary / "secret").chmod(0o644)
        (self.canary / "d").mkdir()
        (self.canary / "d" / "f").write_text("x")
        self.ctx = {
            "data_dir": str(server.data_dir),
            "canary": str(self.canary),
            "server_port": server.port,
            "abstract": f"corral-probe-{os.getpid()}-{os.urandom(4).hex()}",
            "host_ip": host_address(),
            "host_root_dev": os.stat("/").st_dev,  # binds from it must be system paths
        }
        self.ctx["tcp_port"] = self._listen(socket.AF_INET, "127.0.0.1")
        try:
            self.ctx["tcp6_port"] = self._listen(socket.AF_INET6, "::1")
        except OSError:  # no IPv6 loopback on this host
            self.ctx["tcp6_port"] = None
        if self.ctx["host_ip"]:
            self.ctx["host_ip_port"] = self._listen(socket.AF_INET, self.ctx["host_ip"])
        self._listen(socket.AF_UNIX, "\0" + self.ctx["abstract"])
        self.usr_copy: dict[str, Any] | None = None  # host_usr_copy's, once
        self.main_sid = create_sandbox(api)
        self._closers.append(lambda: delete_sandbox(api, self.main_sid))

    def _listen(self, family: int, addr: str) -> int:
        sock = socket.socket(family, socket.SOCK_STREAM)
        self._closers.append(sock.close)
        sock.bind(addr if family == socket.AF_UNIX else (addr, 0))
        sock.listen()
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # the service is real
            probe.connect(sock.getsockname())
        return 0 if family == socket.AF_UNIX else int(sock.getsockname()[1])

    def close(self) -> None:
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()

    def secrets(self) -> list[str]:
        return [
            self.server.admin_key,
            "CORRAL_",
            "PYTEST",
            str(self.server.data_dir),
            "/work/main",
            str(self.canary),
        ]

    def sandbox_dir(self, sid: str) -> Path:
        return sandbox_dir(self.server.data_dir, sid)

    def disk_dir(self, sid: str) -> Path:
        return disk_dir(self.server.data_dir, sid)

    def root_layout(self, sid: str) -> RootLayout:
        return root_layout(self.server.data_dir, sid)

    def snapshot(self) -> dict[str, Any]:
        """What planted links could reach on the host: its state, to compare."""
        paths = [
            self.canary,
            *sorted(self.canary.rglob("*")),
            Path("/etc"),
            Path("/etc/shadow"),
            Path("/etc/passwd"),
            Path("/usr/bin/bash"),
        ]
        state: dict[str, Any] = {}
        for path in paths:
            st = os.lstat(path)
            state[str(path)] = (st.st_ino, st.st_mode, st.st_uid, st.st_mtime_ns)
            if not path.is_dir():
                state[str(path)] += (st.st_nlink, st.st_size)
        state["secret"] = (self.canary / "secret").read_text()
        return state

    def _batch(self, sid: str, probes: list[Probe], user: str | None = None) -> dict[str, Any]:
        items = [
            {"id": p.id, "py": p.py, "sh": p.sh, "timeout": 15}
            for p in probes
            if p.py is not None or p.sh is not None
        ]
        return run_probes(self.api, sid, items, self.ctx, 120_000, PRELUDE_EXTRA, user)

    @functools.cached_property
    def main(self) -> dict[str, Any]:
        probes = [p for p in PROBES if not p.cross and not p.host and p.user == "user"]
        return self._batch(self.main_sid, probes)

    @functools.cached_property
    def main_root(self) -> dict[str, Any]:
        probes = [p for p in PROBES if not p.cross and not p.host and p.user == "root"]
        return self._batch(self.main_sid, probes, user="root")

    @functools.cached_property
    def cross(self) -> dict[str, Any]:
        a, b = create_sandbox(self.api), create_sandbox(self.api)
        self._closers += [lambda: delete_sandbox(self.api, a), lambda: delete_sandbox(self.api, b)]
        setup = exec_(self.api, a, XS_SETUP)
        assert setup["exit_code"] == 0, setup
        start(self.api, a, "python3", args=["-c", XS_HOLDER, "corral-xs-holder"])
        ready = "import socket; socket.socket(socket.AF_UNIX).connect('\\0corral-xs')"
        assert wait_until(
            lambda: exec_(self.api, a, "python3", args=["-c", ready])["exit_code"] == 0, 30.0
        ), "the holder in sandbox A did not come up"
        probes = [p for p in PROBES if p.cross]
        in_a, in_b = self._batch(a, probes), self._batch(b, probes)
        return {p.id: {"a": in_a[p.id], "b": in_b[p.id]} for p in probes}

    def outcome(self, probe: Probe) -> Any:
        """The probe's value; skips or fails (as broken, not escaped) if it gave none."""
        if probe.requires and not self.ctx.get(probe.requires):
            pytest.skip(f"this host has no {probe.requires}")
        if probe.host is not None:
            return probe.host(self)
        if probe.cross:
            both = self.cross[probe.id]
            for side in both.values():
                self._require_value(probe, side)
            return {k: side["value"] for k, side in both.items()}
        batch = self.main_root if probe.user == "root" else self.main
        return self._require_value(probe, batch[probe.id])

    @staticmethod
    def _require_value(probe: Probe, got: dict[str, Any]) -> Any:
        if "value" in got:
            return got["value"]
        if probe.i386 and got.get("signal"):
            pytest.skip(f"int 0x80 is not available on this kernel (signal {got['signal']})")
        pytest.fail(f"probe {probe.id} is broken (no result): {got}")


def host_address() -> str | None:
    """The host's first global IPv4 address."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    for i, word in enumerate(out):
        if word == "inet":
            return out[i + 1].split("/")[0]
    return None


# --- the tests -------------------------------------------------------------------------------

RESULTS: list[tuple[Probe, bool]] = []  # (probe, contained), in run order
BROKEN: list[str] = []  # probes that gave no value or one the check could not read
ACCEPTED: dict[str, Any] = {}  # accepted findings (not escapes): what each probe saw


@pytest.fixture(scope="module")
def battery_server() -> Iterator[Server]:
    with dedicated_server("corral-test-battery-") as srv:
        yield srv


@pytest.fixture(scope="module")
def env(battery_server: Server) -> Iterator[Env]:
    with battery_server.client() as api:
        environment = Env(battery_server, api)
        yield environment
        environment.close()


def _param(probe: Probe) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=probe.escape)] if probe.escape else []
    return pytest.param(probe, id=probe.id, marks=marks)


def test_table_is_sound() -> None:
    ids = [p.id for p in PROBES]
    assert len(ids) == len(set(ids)), "duplicate probe ids"
    assert {p.category for p in PROBES} == set(CATEGORIES)
    assert len(PROBES) >= 60
    for p in PROBES:
        assert sum(x is not None for x in (p.py, p.sh, p.host)) == 1, p.id
        assert not (p.escape and p.accepted), p.id


@pytest.mark.parametrize("probe", [_param(p) for p in PROBES])
def test_probe(probe: Probe, env: Env) -> None:
    try:
        value = env.outcome(probe)
    except (Exception, pytest.fail.Exception):  # broke (no value): the summary says so
        BROKEN.append(probe.id)
        raise
    try:
        contained = bool(probe.check(value, env))
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        BROKEN.append(probe.id)
        pytest.fail(f"probe {probe.id} is broken: its check cannot read {value!r}: {exc!r}")
    RESULTS.append((probe, contained))
    assert contained, (
        f"ESCAPE {probe.id} [{probe.category}]: expected {probe.expect}; got {value!r}"
    )
    if probe.accepted:  # within the accepted bound: record what it saw, do not fail
        ACCEPTED[probe.id] = value or "not seen any more"
        print(f"{probe.accepted}; saw {value!r}")


def test_zz_summary() -> None:
    """The battery's verdict: "N probes, 0 escaped"; fails on any escape not known."""
    escaped = [p for p, ok in RESULTS if not ok]
    unknown = [p.id for p in escaped if not p.escape]
    counts = {c: sum(p.category == c for p, _ in RESULTS) for c in CATEGORIES}
    line = f"{len(RESULTS)} probes, {len(escaped)} escaped"
    if escaped:
        line += f" ({', '.join(p.id for p in escaped)})"
    if ACCEPTED:
        line += f"; {len(ACCEPTED)} accepted, not counted as escapes ({', '.join(ACCEPTED)})"
    if BROKEN:
        line += f"; {len(BROKEN)} broken ({', '.join(BROKEN)})"
    per_category = ", ".join(f"{c} {n}" for c, n in counts.items())
    lines = [line, f"per category: {per_category}"]
    by_id = {p.id: p for p in PROBES}
    lines += [f"{pid}: {by_id[pid].accepted}; saw {v!r}" for pid, v in ACCEPTED.items()]
    security_conftest.SUMMARY["escape battery"] = lines
    print("\n".join(lines))
    assert RESULTS, "no probe ran"
    assert not unknown, f"{line}: unexpected escapes {unknown}"
    assert not BROKEN, f"{line}: broken probes {BROKEN}"
    if escaped:
        pytest.xfail(f"{line}: known escapes, each marked xfail on its own probe")
