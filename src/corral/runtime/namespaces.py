"""The embedded default backend: Linux namespaces through bubblewrap.

Each sandbox is one long-lived `bwrap` started under its own unprivileged host uid (never host
root), uid 1000 inside, the host's /usr read-only, a private /tmp, its own /workspace, and no
network. Inside runs the supervisor (supervisor.py), which forks commands on request; the node
passes it the pipes and the command's cgroup over a SOCK_SEQPACKET socket.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import functools
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from corral.pipes import pipe_end
from corral.runtime import idmap, images, ports, rootfs, snapshots
from corral.runtime.base import (
    NODE_PYTHON,
    ExitStatus,
    Injection,
    NeedsRestart,
    ProcessHandle,
    ProcessSpec,
    Runtime,
    SandboxConfig,
    SandboxDied,
    SandboxHandle,
    SpawnError,
    StartUnknown,
    open_pty,
    open_pty_in,
)
from corral.runtime.cgroup_reaper import CgroupReaper
from corral.runtime.cgroups import CgroupTree, favor_dynamic_modifications, find_cgroup2
from corral.runtime.command_cgroups import CommandCgroups
from corral.runtime.disks import SpareDisks, loop_mount, mkfs_command
from corral.runtime.frames import (
    FRAMES_PER_WAKE,
    MAX_FRAME,
    OVER_BUDGET_GRACE,
    PAUSE,
    FrameBudget,
    ProtocolError,
    WarningLog,
    parse_event,
)
from corral.runtime.limits import ResourceControl, Usage
from corral.runtime.loader import (
    clear_mount_point,
    elf_interpreter,
    host_interpreter,
    host_python,
    trusted_python,
)
from corral.runtime.mounts import SharedViews, mount_private_overlay, unmount
from corral.runtime.netpolicy import EgressOptions, NetworkManager, OpenDestination
from corral.runtime.seccomp import build_filter
from corral.runtime.uids import SANDBOX_UID, mapping, slot_base, to_host

log = logging.getLogger(__name__)

SUPERVISOR_CAPS = (
    "CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE", "CAP_CHOWN", "CAP_FOWNER",
    "CAP_SETPCAP",  # only to empty the bounding set of ordinary commands
)  # fmt: skip
MAX_MESSAGE = 1 << 20  # the supervisor reads at most this much per message
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
START_TIMEOUT = 15.0
SPAWN_TIMEOUT = 10.0
PYTHON = "/usr/bin/python3"
TOOLS_MOUNT = "/opt/corral"
HOST_MOUNT = "/.corral/host"  # the host's /usr in a sandbox from an image, for the supervisor
HOST_ETC_MOUNT = "/.corral/host-etc"
SUPERVISOR = Path(__file__).with_name("supervisor.py")
SUPERVISOR_INSIDE = "/.corral/supervisor.py"
# Its code, compiled by the host's interpreter when the node starts: a supervisor started from
# its source compiles it first, which left 2.6 MiB of heap it never gave back in every sandbox.
SUPERVISOR_CODE = "supervisor.pyc"
SUPERVISOR_CODE_INSIDE = "/.corral/supervisor.pyc"
COMPILE = "import py_compile, sys; py_compile.compile(sys.argv[1], sys.argv[2], doraise=True)"
# glibc's loader reads /etc/ld.so.preload in every process, whatever its flags: inside, that file
# is an empty read-only mount (the sandbox's root cannot unmount it), so nothing it writes runs
# in the supervisor. Commands started later get the same empty file.
LD_PRELOAD_FILE = "ld.so.preload"

# Host paths bound read-only when present: what programs need from /etc, nothing secret.
HOST_ETC = (
    "alternatives",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "timezone",
    "mime.types",
    "protocols",
    "services",
    "bash.bashrc",
    "profile",
    "inputrc",
    "python3",
    "python3.11",
    "gai.conf",
    "magic",
    "mime.types",
    # What root's user tools read (useradd, su): configuration only.
    "pam.d",
    "pam.conf",
    "security",
    "login.defs",
    "default",
    "skel",
)

ETC_FILES = {
    "passwd": (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"user:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox user:/workspace:/bin/bash\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    ),
    "group": f"root:x:0:\nuser:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
    "hostname": "sandbox\n",
    "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    "resolv.conf": "",
}

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/workspace",
    "USER": "user",
    "LOGNAME": "user",
    "SHELL": "/bin/bash",
    "LANG": "C.UTF-8",
}


# A sandbox with a network trusts its own CA too (egress_ca.py), through this bundle.
TRUST_BUNDLE = "/.corral/ca-certificates.crt"
TRUST_ENV = {
    name: TRUST_BUNDLE
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                 "DENO_CERT")
}  # fmt: skip

# A template sandbox's own directories (in its storage): what its snapshots copy.
TEMPLATE_DIRS = ("workspace", "etc", "usr-local", "root-home", "home")

SUDO_ENV = {
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "SUDO_USER": "user",
    "SUDO_UID": str(SANDBOX_UID),
    "SUDO_GID": str(SANDBOX_UID),
}


class NamespacesRuntime(Runtime):
    name = "namespaces"
    supports_images = True

    def __init__(
        self,
        *,
        data_dir: Path,
        uid_base: int,
        cgroup_name: str,
        favor_dynmods: bool = False,
        tools_dir: Path | None = None,
        templates_dir: Path | None = None,
        tmp_mb: int = 1024,
        network_open: tuple[OpenDestination, ...] = (),
        link_subnet: ipaddress.IPv4Network | None = None,
        egress: EgressOptions | None = None,
    ):
        self.templates_dir = templates_dir
        self.data_dir = data_dir
        self.images_dir = data_dir / "images"  # the node's image store (images/)
        self.snapshots_dir = data_dir / "snapshots"
        # Templates' root skeletons (rootfs.build_skeleton), made once per run of the node.
        self.skeletons_dir = data_dir / "runtime" / "skeletons"
        self.empty_dir = data_dir / "runtime" / "empty"  # bound over what sandboxes must not see
        self.empty_view = self.empty_dir  # its read-only view; set by prepare
        self._skeletons: dict[str, Path] = {}
        self._namespaces: dict[int, int] = {}  # a slot's first host uid -> its user namespace
        self._skeleton_lock = threading.Lock()
        # Sandboxes made before roots were copy-on-write: their own etc/, usr-local/ and the
        # rest in their storage, over a read-only /usr.
        self._legacy: set[str] = set()
        self.tools_source = tools_dir  # shown read-only at /opt/corral (interpreters, helpers)
        self.uid_base = uid_base
        self.cgroup_name = cgroup_name
        self.favor_dynmods = favor_dynmods
        self.tmp_bytes = tmp_mb * 1024 * 1024
        # What sandboxes are shown of the host's directories comes from views of them
        # (mounts.py), so that their mountinfo says nothing of where the data dir is.
        self.views = SharedViews(data_dir / "runtime" / "views")
        self.supervisor_source = data_dir / "runtime" / "supervisor"
        self.supervisor_path = self.supervisor_source / "supervisor.py"  # bound; set by prepare
        self.supervisor_code_path: Path | None = None  # its compiled code, bound; set by prepare
        self.tools_dir = tools_dir  # bound at /opt/corral; set by prepare
        self.cgroups: CgroupTree | None = None
        self.resources: ResourceControl | None = None
        self.reaper = CgroupReaper()  # removes finished commands' cgroups, in batches
        self.net = NetworkManager(
            cgroup_name, subnet=link_subnet, open_to_sandboxes=network_open, egress=egress,
            scratch=data_dir / "runtime" / "egress",
        )  # fmt: skip
        self.seccomp_bpf = b""
        self.spares = SpareDisks(data_dir / "runtime")  # disks made ahead (disks.py)

    async def prepare(self) -> list[str]:
        warnings: list[str] = []
        for tool in ("bwrap", "setpriv"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (scripts/setup.sh installs it)")
        if not os.access(PYTHON, os.X_OK):
            raise RuntimeError(f"{PYTHON} is missing: the in-sandbox supervisor needs it")
        if os.geteuid() != 0:
            raise RuntimeError("the namespaces runtime needs root to drop to per-sandbox uids")
        self._check_traversable(self.data_dir)
        if self.tools_source is not None:
            self.tools_source.mkdir(parents=True, exist_ok=True)
            self.tools_source.chmod(0o755)
            self._check_traversable(self.tools_source)
        runtime_dir = self.data_dir / "runtime"
        self.supervisor_source.mkdir(parents=True, exist_ok=True)
        for d in (self.data_dir, runtime_dir, self.supervisor_source):
            d.chmod(0o755)
        shutil.copyfile(SUPERVISOR, self.supervisor_source / SUPERVISOR.name)
        (self.supervisor_source / SUPERVISOR.name).chmod(0o644)
        compiled = await asyncio.to_thread(self._compile_supervisor)
        if compiled is not None:
            warnings.append(compiled)
        self.empty_dir.mkdir(exist_ok=True)
        self.empty_dir.chmod(0o555)
        sandboxes = self.data_dir / "sandboxes"
        sandboxes.mkdir(exist_ok=True)
        sandboxes.chmod(0o711)
        if shutil.which("mkfs.ext4"):
            await asyncio.to_thread(self.spares.setup)
        await asyncio.to_thread(self._show_shared_dirs)
        if not self.views.available:
            warnings.append(
                "overlay mounts are unavailable: sandboxes see the host paths of the tools, "
                "the supervisor and templates in /proc/self/mountinfo"
            )
        elif not self.views.writable:
            warnings.append(
                "the data dir's file system cannot hold an overlay's upper layer: sandboxes "
                "without a disk limit see their directory's host path in /proc/self/mountinfo"
            )

        self.seccomp_bpf = build_filter()
        mount = find_cgroup2()
        if mount is None:
            warnings.append(
                "no writable cgroup2 hierarchy: a timeout or cancel kills the command's process "
                "group and its sandbox-wide descendants only through the supervisor"
            )
        else:
            if self.favor_dynmods:
                refused = await asyncio.to_thread(favor_dynamic_modifications, mount)
                if refused:
                    warnings.append(refused)
            self.cgroups = CgroupTree(mount, self.cgroup_name)
            self.cgroups.setup()
            if not self.cgroups.has_kill:
                warnings.append("cgroup.kill missing (kernel < 5.14): tree kill uses the freezer")
        self.resources = ResourceControl(
            self.cgroup_name, self.cgroups.base if self.cgroups else None
        )
        self.resources.setup()
        unavailable = await self.net.setup()
        if unavailable:
            warnings.append(unavailable)
        for limit, how in self.enforceable().items():
            if not how:
                warnings.append(f"this host cannot enforce the sandbox limit {limit!r}")
        return warnings

    def _compile_supervisor(self) -> str | None:
        """supervisor.pyc beside supervisor.py, compiled by the interpreter that runs it in
        sandboxes from the host's /usr; a warning if it could not be."""
        code = self.supervisor_source / SUPERVISOR_CODE
        code.unlink(missing_ok=True)
        source = self.supervisor_source / SUPERVISOR.name
        try:
            subprocess.run(
                [PYTHON, "-I", "-S", "-c", COMPILE, str(source), str(code)],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            code.unlink(missing_ok=True)
            return f"the supervisor runs from its source (compiling it failed: {exc})"
        code.chmod(0o644)
        return None

    def _show_shared_dirs(self) -> None:
        """The read-only views that every sandbox binds: the supervisor's and the tools'."""
        self.views.setup()
        self.supervisor_path = self.views.view(self.supervisor_source) / SUPERVISOR.name
        code = self.views.view(self.supervisor_source) / SUPERVISOR_CODE
        self.supervisor_code_path = code if code.is_file() else None
        self.empty_view = self.views.view(self.empty_dir)
        if self.tools_source is not None:
            self.tools_dir = self.views.view(self.tools_source)

    def enforceable(self) -> dict[str, str]:
        found = self.resources.enforceable() if self.resources else {}
        found["disk_mb"] = "ext4 image" if shutil.which("mkfs.ext4") else ""
        found["network"] = "netns + nftables" if self.net.available else ""
        return found

    @staticmethod
    def _check_traversable(path: Path) -> None:
        # bwrap binds the workspace as the sandbox's uid, which must be able to reach it.
        for parent in [path, *path.parents]:
            if parent.exists() and not os.stat(parent).st_mode & 0o001:
                raise RuntimeError(
                    f"{parent} is not searchable by other users; choose a data dir whose parents "
                    "are (e.g. under /var/lib)"
                )

    def host_uid(self, config: SandboxConfig) -> int:
        """The host uid that uid 1000 inside maps to (and that runs bwrap)."""
        return to_host(self.host_root_uid(config), SANDBOX_UID)

    def host_root_uid(self, config: SandboxConfig) -> int:
        """The host uid that uid 0 inside (sudo) maps to: unprivileged on the host too."""
        return slot_base(self.uid_base, config.slot)

    def templates(self) -> list[str]:
        found = ["host"]
        if self.templates_dir is not None and self.templates_dir.is_dir():
            found += sorted(
                p.name for p in self.templates_dir.iterdir() if (p / "usr" / "bin").is_dir()
            )
        return found

    def template_root(self, config: SandboxConfig) -> Path:
        """The directory whose usr/ (and etc/) the sandbox's root is made of."""
        if config.template == "host":
            return Path("/")
        if self.templates_dir is None or config.template not in self.templates():
            raise RuntimeError(f"no template {config.template!r}")
        return self.views.view(self.templates_dir / config.template)

    def template_source(self, config: SandboxConfig) -> Path:
        """The template's own directory (not its view: an idmapped mount needs the real one)."""
        if config.template == "host":
            return Path("/")
        if self.templates_dir is None or config.template not in self.templates():
            raise RuntimeError(f"no template {config.template!r}")
        return self.templates_dir / config.template

    def expand_argv(self, config: SandboxConfig, argv: list[str]) -> list[str]:
        """NODE_PYTHON as this sandbox runs it: the host's, from its read-only bind."""
        if not argv or argv[0] != NODE_PYTHON:
            return argv
        if self.overlay_root(config):
            return [*host_interpreter(HOST_MOUNT, PYTHON), *argv[1:]]
        return [PYTHON, *argv[1:]]  # the template's /usr, read-only

    def overlay_root(self, config: SandboxConfig) -> bool:
        """Whether the sandbox's root is copy-on-write (rootfs.py): every sandbox but those
        of the layout before it."""
        return config.image is not None or config.id not in self._legacy

    def root_layout(self, config: SandboxConfig) -> rootfs.RootLayout:
        """The copy-on-write root of a sandbox from an image: its writable layers are on its
        disk when it has a disk limit."""
        writable = config.dir / ("disk" if config.limits.disk_mb else "cow")
        return rootfs.RootLayout(config.dir, writable)

    def storage(self, config: SandboxConfig) -> Path:
        """Where the sandbox's writable directories are: its own file system, mounted at
        disk/ (its ext4 image when it has a disk limit, else an overlay of files/), or files/
        itself where overlays are unavailable."""
        if config.limits.disk_mb or self.views.writable:
            return config.dir / "disk"
        return config.dir / "files"

    def workspace(self, config: SandboxConfig) -> Path:
        if self.overlay_root(config):
            return self.root_layout(config).workspace
        return self.storage(config) / "workspace"

    def _bwrap_options(self, config: SandboxConfig, preload_fd: int) -> list[str]:
        """bwrap's options; passed through a pipe (`--args FD`), since /proc/1/cmdline shows
        whatever bwrap got on its command line to the sandbox. `preload_fd` reads the (empty)
        /etc/ld.so.preload the sandbox gets."""
        if self.overlay_root(config):
            return self._image_bwrap_options(config, preload_fd)
        args = [
            *self._common_options(config),
            "--ro-bind", str(self.template_root(config) / "usr"), "/usr",
            "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/sbin", "/sbin",
            *self._special_mounts(config),
            "--dir", "/var", "--symlink", "../tmp", "/var/tmp",
        ]  # fmt: skip
        # /etc is the sandbox's own (its root may edit it); the host's harmless parts are shown
        # read-only under /.corral/host-etc, and /etc links to them until root replaces a link.
        for name in dict.fromkeys(HOST_ETC):
            args += ["--ro-bind-try", f"/etc/{name}", f"{HOST_ETC_MOUNT}/{name}"]
        args += ["--bind", str(self.storage(config) / "etc"), "/etc"]
        args += ["--ro-bind-data", str(preload_fd), f"/etc/{LD_PRELOAD_FILE}"]
        args += [
            "--ro-bind", str(self.supervisor_path), SUPERVISOR_INSIDE,
            *self._supervisor_code_bind(),
            *(["--ro-bind", str(self.tools_dir), TOOLS_MOUNT] if self.tools_dir else []),
            # The sandbox's own /usr/local, writable by its root (sudo pip install, make
            # install); the host's /usr/local is not shown.
            "--bind", str(self.storage(config) / "usr-local"), "/usr/local",
            # Root's home, and /home for users root adds (useradd -m).
            "--bind", str(self.storage(config) / "root-home"), "/root",
            "--bind", str(self.storage(config) / "home"), "/home",
            "--bind", str(self.workspace(config)), "/workspace",
        ]  # fmt: skip
        args += self._volume_options(config)
        args += ["--chdir", "/workspace", "--remount-ro", "/"]
        return args

    def _image_bwrap_options(self, config: SandboxConfig, preload_fd: int) -> list[str]:
        """A writable root of the sandbox's own (rootfs.py): an image's, or a template's with
        its /usr; the node's own mounts go over it, and the host's /usr only for the
        supervisor's interpreter."""
        layout = self.root_layout(config)
        # What the sandbox controls is mounted first, the node's own last, so that nothing of
        # the sandbox's can cover them; their mount points were made safe before the start
        # (rootfs.secure_mount_points).
        args = [
            *self._common_options(config),
            # glibc in the supervisor reads locales and gconv modules by path: the host's.
            "--setenv", "LOCPATH", f"{HOST_MOUNT}/usr/lib/locale",
            "--setenv", "GCONV_PATH", f"{HOST_MOUNT}{self._gconv_dir}",
            "--bind", str(layout.root), "/",
            "--bind", str(self.workspace(config)), "/workspace",
            *self._volume_options(config),
        ]  # fmt: skip
        if config.image is None:
            args += ["--bind", str(layout.usr), "/usr"]
        args += [
            *self._special_mounts(config),
            "--ro-bind-data", str(preload_fd), f"/etc/{LD_PRELOAD_FILE}",
            "--ro-bind", "/usr", HOST_MOUNT + "/usr",
            # The host's /usr/local is the host's own, not part of what sandboxes are shown.
            "--ro-bind", str(self.empty_view), HOST_MOUNT + "/usr/local",
            "--ro-bind", str(self.supervisor_path), SUPERVISOR_INSIDE,
            *self._supervisor_code_bind(),
            *(["--ro-bind", str(self.tools_dir), TOOLS_MOUNT] if self.tools_dir else []),
        ]  # fmt: skip
        if config.image is None:
            # The host's harmless /etc files the skeleton's etc/ links to.
            for name in dict.fromkeys(HOST_ETC):
                args += ["--ro-bind-try", f"/etc/{name}", f"{HOST_ETC_MOUNT}/{name}"]
        return [*args, "--chdir", "/workspace"]

    def _supervisor_code_bind(self) -> list[str]:
        if self.supervisor_code_path is None:
            return []
        return ["--ro-bind", str(self.supervisor_code_path), SUPERVISOR_CODE_INSIDE]

    def _supervisor_script(self, hosts_interpreter: bool) -> str:
        """What the supervisor's interpreter runs: the compiled code if that interpreter is the
        host's, which compiled it (another's may be another version); else the source."""
        if hosts_interpreter and self.supervisor_code_path is not None:
            return SUPERVISOR_CODE_INSIDE
        return SUPERVISOR_INSIDE

    @functools.cached_property
    def _gconv_dir(self) -> str:
        loader = elf_interpreter(Path(os.path.realpath(PYTHON)))
        libdir = os.path.dirname(os.path.realpath(loader)) if loader else "/usr/lib"
        return f"{libdir}/gconv"

    def _mount_points(self, config: SandboxConfig) -> dict[str, object]:
        """Where the node mounts in a copy-on-write root (rootfs.secure_mount_points)."""
        dirs = ["/workspace", "/tmp", "/proc", "/dev", "/etc", *(v.path for v in config.volumes)]
        if self.tools_dir:
            dirs.append(TOOLS_MOUNT)
        node_tree: dict[str, bool] = {"host": True, "host/usr": True, "supervisor.py": False}
        if self.supervisor_code_path is not None:
            node_tree[SUPERVISOR_CODE] = False
        files = [f"/etc/{LD_PRELOAD_FILE}"]
        if config.network != "none":
            node_tree["ca-certificates.crt"] = False
            files.append("/etc/resolv.conf")
        if config.image is None:
            dirs.append("/usr")
            node_tree["host-etc"] = True
            for name in dict.fromkeys(HOST_ETC):
                if (Path("/etc") / name).exists():
                    node_tree[f"host-etc/{name}"] = (Path("/etc") / name).is_dir()
        return {"dirs": dirs, "files": files, "node_tree": node_tree}

    def _volume_options(self, config: SandboxConfig) -> list[str]:
        args = []
        for volume in config.volumes:
            # The root of the volume's own file system: mountinfo shows no host path for it.
            mode = "--ro-bind" if volume.read_only else "--bind"
            args += [mode, str(self.volume_dir(volume.id) / "data"), volume.path]
        return args

    def _special_mounts(self, config: SandboxConfig) -> list[str]:
        # An image's users are not only the sandbox user: its /tmp is everyone's.
        perms = ["--perms", "1777"] if config.image is not None else []
        return [
            "--proc", "/proc",
            "--dev", "/dev",
            *(
                ["--bind", str(self.storage(config) / "tmp"), "/tmp"]
                if config.limits.disk_mb
                else [*perms, "--size", str(self.tmp_bytes), "--tmpfs", "/tmp"]
            ),
            "--size", str(64 * 1024 * 1024), "--tmpfs", "/dev/shm",
        ]  # fmt: skip

    def _common_options(self, config: SandboxConfig) -> list[str]:
        share_net = ["--share-net"] if config.network != "none" else []
        return [
            # No --disable-userns (bwrap refuses it with --userns-block-fd): the seccomp filter
            # denies unshare, setns and clone with namespace flags, clone3 included.
            "--unshare-all", *share_net, "--unshare-user",
            "--die-with-parent", "--new-session",
            # The supervisor keeps what it needs to start sudo commands as uid 0 of the
            # sandbox's user namespace; every other command drops all capabilities.
            "--cap-drop", "ALL", *[a for c in SUPERVISOR_CAPS for a in ("--cap-add", c)],
            "--clearenv", "--setenv", "PATH", DEFAULT_ENV["PATH"],
            "--hostname", "sandbox",
        ]  # fmt: skip

    # --- volumes ---

    def volume_dir(self, volume_id: str) -> Path:
        if "/" in volume_id or volume_id in ("", ".", ".."):
            raise ValueError(f"not a volume id: {volume_id!r}")
        return self.data_dir / "volumes" / volume_id

    async def create_volume(self, volume_id: str, size_mb: int) -> None:
        await asyncio.to_thread(self._create_volume, volume_id, size_mb)

    def _create_volume(self, volume_id: str, size_mb: int) -> None:
        """An ext4 image of its own (sparse): its size is its limit, and a sandbox binds the
        root of it, which names no host path."""
        home = self.volume_dir(volume_id)
        home.mkdir(parents=True, exist_ok=True)
        # Traversable (bwrap binds data/ as the sandbox's uid), not listable; the image is
        # root's alone.
        home.parent.chmod(0o711)
        home.chmod(0o711)
        image = home / "disk.img"
        if not image.exists():
            partial = home / "disk.img.new"
            with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.truncate(size_mb * 1024 * 1024)
            subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal,^resize_inode",
                 "-i", "65536", str(partial)],
                check=True, capture_output=True,
            )  # fmt: skip
            partial.rename(image)
        self._mount_volume(home)

    @staticmethod
    def _mount_volume(home: Path) -> None:
        data = home / "data"
        data.mkdir(exist_ok=True)
        if os.path.ismount(data):
            return
        subprocess.run(
            ["mount", "-o", "loop,nosuid,nodev", str(home / "disk.img"), str(data)],
            check=True, capture_output=True,
        )  # fmt: skip
        lost = data / "lost+found"
        if lost.is_dir() and not any(lost.iterdir()):
            lost.rmdir()

    async def remove_volume(self, volume_id: str) -> None:
        await asyncio.to_thread(self._remove_volume, volume_id)

    def _remove_volume(self, volume_id: str) -> None:
        home = self.volume_dir(volume_id)
        if os.path.ismount(home / "data"):
            unmount(home / "data")
        if home.exists():
            shutil.rmtree(home)

    def _attach_volumes(self, config: SandboxConfig, uid: int) -> None:
        """Each volume mounted (again, after a restart) and owned by this sandbox's user:
        sandboxes have uids of their own, so what an earlier one wrote is handed over."""
        for volume in config.volumes:
            home = self.volume_dir(volume.id)
            if not (home / "disk.img").exists():
                raise RuntimeError(f"volume {volume.id} is not on this node")
            self._mount_volume(home)
            data = home / "data"
            if os.lstat(data).st_uid != uid:
                for root, dirs, files in os.walk(data):
                    for name in (*dirs, *files):
                        os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)
                os.chown(data, uid, uid)
            data.chmod(0o755)

    def _command_line(
        self, config: SandboxConfig, args_fd: int, sock_fd: int, info_fd: int, block_fd: int
    ) -> list[str]:
        uid = self.host_uid(config)
        if self.overlay_root(config):
            # The root is the sandbox root's to change, /usr included: the host's interpreter.
            user = (config.user or "root") if config.image is not None else str(SANDBOX_UID)
            supervisor = host_python(
                HOST_MOUNT, PYTHON, self._supervisor_script(True), f"--user={user}", str(sock_fd)
            )
        else:
            # Nothing the sandbox's root may write (its /etc, /usr/local) changes the code the
            # supervisor and its launcher (a fork, no exec) run.
            script = self._supervisor_script(config.template == "host")
            supervisor = trusted_python(self.template_root(config), PYTHON, script, str(sock_fd))
        return [
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            "bwrap", "--args", str(args_fd),
            # bwrap waits while the node writes the user namespace's uid map.
            "--info-fd", str(info_fd), "--userns-block-fd", str(block_fd),
            "--", *supervisor,
        ]  # fmt: skip

    async def start(self, config: SandboxConfig) -> SandboxHandle:
        with self.spares.starting():
            return await self._start(config)

    async def _start(self, config: SandboxConfig) -> SandboxHandle:
        uid = self.host_uid(config)
        await asyncio.to_thread(self._make_dirs, config, uid)
        if config.volumes:
            await asyncio.to_thread(self._attach_volumes, config, uid)
        if not self.overlay_root(config):
            await asyncio.to_thread(
                clear_mount_point, self.storage(config) / "etc", LD_PRELOAD_FILE,
                self.host_root_uid(config),
            )  # fmt: skip
            if config.network != "none":
                await asyncio.to_thread(
                    clear_mount_point, self.storage(config) / "etc", "resolv.conf",
                    self.host_root_uid(config),
                )  # fmt: skip
        cgroup: Path | None = None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with contextlib.suppress(OSError):
            parent.setsockopt(socket.SOL_SOCKET, 32, 2 * MAX_MESSAGE)  # SO_SNDBUFFORCE
        seccomp_fd = _pipe_with(self.seccomp_bpf)
        preload_fd = _pipe_with(b"")
        options = self._bwrap_options(config, preload_fd)
        net_fds = self._network_files(config, options)
        options += ["--add-seccomp-fd", str(seccomp_fd)]
        args_r = _pipe_with(("\0".join(options) + "\0").encode())
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        block_r, block_w = os.pipe2(os.O_CLOEXEC)
        argv = self._command_line(config, args_r, child.fileno(), info_w, block_r)
        if config.network != "none":
            netns = await self.net.attach(
                config.slot, config.network, list(config.allow), config.inject
            )
            argv = ["nsenter", f"--net={netns}", "--", *argv]
        joins: list[str] = []
        if self.cgroups is not None:
            cgroup = self.cgroups.sandbox(config.id)
            await self.cgroups.kill_and_remove(cgroup)
            cgroup.mkdir()
            joins.append(cgroup / "cgroup.procs")
        if self.resources is not None:
            joins += self.resources.create(config.id, config.limits)
        if joins:
            # Join the sandbox's cgroups before bwrap starts, so nothing of it runs outside.
            join = (
                'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; '
                'shift; n=$((n-1)); done; exec "$@"'
            )
            argv = ["/bin/sh", "-c", join, "sh", str(len(joins)), *map(str, joins), *argv]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=[
                    args_r,
                    seccomp_fd,
                    preload_fd,
                    child.fileno(),
                    info_w,
                    block_r,
                    *net_fds,
                ],
                start_new_session=True,
                # bwrap stays the sandbox's pid 1, readable in /proc/1/environ: give it nothing
                # of the server's environment.
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                cwd="/",
            )
        except BaseException:
            os.close(info_r)
            os.close(block_w)
            raise
        finally:
            for fd in (args_r, seccomp_fd, preload_fd, info_w, block_r, *net_fds):
                os.close(fd)
            child.close()
        sandbox = NamespacesSandbox(self, config, proc, parent, cgroup)
        try:
            sandbox.inner = await asyncio.wait_for(
                self._map_users(config, info_r, block_w), START_TIMEOUT
            )
            # Its network namespace, opened now, before the sandbox runs anything: what its
            # ports are reached through (runtime/ports.py).
            sandbox.netns_fd = ports.open_netns(sandbox.inner[0])
            await asyncio.wait_for(sandbox.ready, START_TIMEOUT)
        except (TimeoutError, SandboxDied, OSError, ValueError) as exc:
            detail = await sandbox.startup_error()
            await sandbox.stop()
            raise RuntimeError(f"sandbox did not start: {detail or exc}") from None
        return sandbox

    def _network_files(self, config: SandboxConfig, options: list[str]) -> list[int]:
        """A sandbox with a network gets a read-only /etc/resolv.conf naming the node's DNS
        forwarder, and a trust store with its own CA (TRUST_BUNDLE, and over the host's bundle
        where it shows the host's /etc/ssl); mounted ahead of `--chdir`, the last option before
        the root turns read-only. Returns the descriptors to pass."""
        if config.network == "none":
            return []
        bundle = self.net.trust_bundle(config.slot, config.id)
        fds = [_pipe_with(self.net.resolv_conf(config.slot)), _pipe_with(bundle)]
        extra = ["--perms", "0644", "--ro-bind-data", str(fds[0]), "/etc/resolv.conf",
                 "--perms", "0644", "--ro-bind-data", str(fds[1]), TRUST_BUNDLE]  # fmt: skip
        host_bundle = "ssl/certs/ca-certificates.crt"
        shown = f"--ro-bind-try /etc/ssl {HOST_ETC_MOUNT}/ssl" in " ".join(options)
        if shown and os.path.isfile(f"/etc/{host_bundle}"):
            fds.append(_pipe_with(bundle))
            extra += ["--perms", "0644", "--ro-bind-data", str(fds[2]),
                      f"{HOST_ETC_MOUNT}/{host_bundle}"]  # fmt: skip
        at = len(options) - options[::-1].index("--chdir") - 1
        options[at:at] = extra
        return fds

    async def _map_users(
        self, config: SandboxConfig, info_fd: int, block_fd: int
    ) -> tuple[int, int]:
        """Map the sandbox's uids to its block of host uids (uids.py), then let bwrap go on.
        Returns the host pid of the sandbox's pid 1 and its start time (`start_time`)."""
        loop = asyncio.get_running_loop()
        try:
            reader = asyncio.StreamReader()
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), await pipe_end(info_fd)
            )
            try:
                data = await reader.readuntil(b"}")
            finally:
                transport.close()
            pid = int(json.loads(data)["child-pid"])
            text = mapping(self.host_root_uid(config))
            # Written by host root: an unprivileged bwrap could map only its own uid.
            Path(f"/proc/{pid}/uid_map").write_text(text)  # noqa: ASYNC240 - procfs
            Path(f"/proc/{pid}/gid_map").write_text(text)  # noqa: ASYNC240 - procfs
            started = start_time(pid)
            os.write(block_fd, b"1")
            return pid, started
        except asyncio.IncompleteReadError:
            raise SandboxDied("bwrap exited before creating the sandbox") from None
        finally:
            os.close(block_fd)

    def _make_dirs(self, config: SandboxConfig, uid: int) -> None:
        config.dir.mkdir(parents=True, exist_ok=True)
        os.chown(config.dir, uid, uid)
        config.dir.chmod(0o700)
        if config.image is None and self._is_legacy(config):
            self._legacy.add(config.id)
        else:
            self._legacy.discard(config.id)
            self._make_overlay_root(config, uid)
            return
        storage = self.storage(config)
        if config.limits.disk_mb:
            self._mount_disk(config, uid)
            _fresh_tmp(storage / "tmp", uid)
        else:
            self._adopt_flat_layout(config)
            (config.dir / "files").mkdir(exist_ok=True)
            if self.views.writable and not os.path.ismount(storage):
                mount_private_overlay(config.dir, storage)
        root = self.host_root_uid(config)
        self._adopt_old_uids(config, storage)
        if config.snapshot and not (storage / "etc").exists():
            self._restore_template_snapshot(config, storage)
        self._seed_etc(storage / "etc", root, self.template_root(config))
        for name, mode in (("usr-local", 0o755), ("root-home", 0o700), ("home", 0o755)):
            path = storage / name
            path.mkdir(exist_ok=True)
            if os.lstat(path).st_uid != root:
                os.chown(path, root, root, follow_symlinks=False)
            path.chmod(mode)
        ws = self.workspace(config)
        ws.mkdir(exist_ok=True)
        ws.chmod(0o755)
        st = os.lstat(ws)
        if st.st_uid != uid:
            os.chown(ws, uid, uid, follow_symlinks=False)

    def _restore_template_snapshot(self, config: SandboxConfig, storage: Path) -> None:
        """A first start from a template sandbox's snapshot: copies of its directories."""
        assert config.snapshot is not None
        try:
            info = snapshots.read_info(self.snapshot_dir(config.snapshot))
        except snapshots.SnapshotError as exc:
            raise RuntimeError(str(exc)) from None
        if info.image is not None or (info.template or "host") != config.template:
            raise RuntimeError(f"snapshot {config.snapshot} is not of template {config.template}")
        try:
            snapshots.restore(
                self.snapshot_dir(config.snapshot), TEMPLATE_DIRS, storage,
                self.host_root_uid(config),
            )  # fmt: skip
        except snapshots.SnapshotError as exc:
            raise RuntimeError(str(exc)) from None

    def _adopt_old_uids(self, config: SandboxConfig, storage: Path) -> None:
        """Hand a sandbox's files from the two host uids an earlier version gave its slot
        (root, then user) to those of its block now; once, on its first start since."""
        old_root = self.uid_base + 2 * config.slot
        old_user = old_root + 1
        workspace = storage / "workspace"
        try:
            if os.lstat(workspace).st_uid != old_user or old_user == self.host_uid(config):
                return
        except FileNotFoundError:
            return
        moves = {old_user: self.host_uid(config), old_root: self.host_root_uid(config)}
        for top, dirs, files in os.walk(storage):
            for name in (".", *dirs, *files):
                path = os.path.join(top, name)
                st = os.lstat(path)
                uid, gid = moves.get(st.st_uid, -1), moves.get(st.st_gid, -1)
                if uid != -1 or gid != -1:
                    os.chown(path, uid, gid, follow_symlinks=False)

    def _is_legacy(self, config: SandboxConfig) -> bool:
        """A template sandbox of the layout before copy-on-write roots (its own etc/ in its
        storage), or one starting from such a sandbox's snapshot (copies of those dirs)."""
        if config.snapshot:
            directory = self.snapshot_dir(config.snapshot)
            if (directory / "etc").is_dir() and not (directory / "root").is_dir():
                return True
        if (config.dir / "etc").is_dir() or (config.dir / "files" / "etc").is_dir():
            return True
        if config.limits.disk_mb and (config.dir / "disk.img").exists():
            self._mount_disk(config, self.host_uid(config))
            return (config.dir / "disk" / "etc").is_dir()
        return False

    def skeleton(self, config: SandboxConfig) -> Path:
        """The template's root skeleton for this run of the node, made on first use."""
        with self._skeleton_lock:
            found = self._skeletons.get(config.template)
            if found is not None:
                return found
            source = self.template_source(config)
            self.skeletons_dir.mkdir(parents=True, exist_ok=True)
            self.skeletons_dir.chmod(0o755)
            target = self.skeletons_dir / f"{config.template}.{os.getpid()}.{len(self._skeletons)}"
            if target.exists():
                remove_tree(target)
            host_links = {
                name: f"{HOST_ETC_MOUNT}/{name}"
                for name in dict.fromkeys(HOST_ETC)
                if (Path("/etc") / name).exists()
            }
            rootfs.build_skeleton(
                target, etc=None if config.template == "host" else source / "etc",
                files=ETC_FILES, links=host_links,
            )  # fmt: skip
            self._skeletons[config.template] = target
            return target

    def _make_overlay_root(self, config: SandboxConfig, uid: int) -> None:
        """The root, workspace (and a template's /usr) overlays of the sandbox (rootfs.py)."""
        layout = self.root_layout(config)
        if config.limits.disk_mb:
            self._mount_disk(config, uid)
            _fresh_tmp(layout.writable / "tmp", uid)
        else:
            layout.writable.mkdir(mode=0o700, exist_ok=True)
        root = self.host_root_uid(config)
        template = config.image is None
        rootfs.prepare_writable(layout, root, uid, usr=template)
        if template:
            skeleton = self.skeleton(config)
            layers_root, layers = skeleton.parent, [skeleton]
            usr: Path | None = self.template_source(config) / "usr"
        else:
            image = images.get_image(self.images_dir, config.image)  # type: ignore[arg-type]
            layers_root = self.images_dir / "layers"
            layers = images.layer_dirs(self.images_dir, image)
            usr = None
        stack = []
        if config.snapshot:
            self.snapshot_dir(config.snapshot)  # a well-formed id
            try:
                stack = snapshots.chain(self.snapshots_dir, config.snapshot)
            except snapshots.SnapshotError as exc:
                raise RuntimeError(str(exc)) from None
            info = snapshots.read_info(stack[0])
            if info.image != config.image or (template and info.template != config.template):
                raise RuntimeError(f"snapshot {config.snapshot} is of another image or template")
        rootfs.unmount_root(layout)  # the layer is changed only while nothing has it mounted
        rootfs.secure_mount_points(layout.upper, owner=root, **self._mount_points(config))  # type: ignore[arg-type]
        rootfs.mount_root(
            layout, layers_root=layers_root, layers=layers, snapshots=stack,
            userns_fd=self._user_namespace(root), usr=usr,
        )  # fmt: skip

    def _user_namespace(self, root: int) -> int:
        """A user namespace of the slot's mapping, for its idmapped mounts: made once per
        slot and run of the node (the mapping never changes), kept open."""
        with self._skeleton_lock:
            fd = self._namespaces.get(root)
            if fd is None:
                fd = self._namespaces[root] = idmap.user_namespace(mapping(root))
            return fd

    def snapshot_dir(self, snapshot_id: str) -> Path:
        if "/" in snapshot_id or snapshot_id.startswith(".") or not snapshot_id:
            raise ValueError(f"not a snapshot id: {snapshot_id!r}")
        return self.snapshots_dir / snapshot_id

    async def snapshot(self, config: SandboxConfig, snapshot_id: str) -> int:
        self.snapshot_dir(snapshot_id)
        if self.overlay_root(config):
            layout = self.root_layout(config)
            mounted = layout.root
            layers = {"root": layout.upper, "workspace": layout.workspace_upper}
            if config.image is None:
                layers["usr"] = layout.usr_upper
            parent = config.snapshot  # its own layers are only what changed since
            if not await asyncio.to_thread(os.path.ismount, mounted):
                raise snapshots.SnapshotError("the sandbox is not running")
        else:
            # Read from the file system that holds them (an overlay cannot be idmapped): its
            # disk, or files/ under its private overlay.
            holder = config.dir / ("disk" if config.limits.disk_mb else "files")
            layers = {name: holder / name for name in TEMPLATE_DIRS if (holder / name).is_dir()}
            parent = None  # copies: a whole
        frozen = await self._freeze(config)
        try:
            return await asyncio.to_thread(
                snapshots.capture, self.snapshots_dir, snapshot_id,
                scratch=config.dir, layers=layers, base_uid=self.host_root_uid(config),
                image=config.image, template=None if config.image else config.template,
                parent=parent,
            )  # fmt: skip
        finally:
            if frozen:
                await self._thaw(config)

    async def _freeze(self, config: SandboxConfig) -> bool:
        """Freeze the sandbox's processes for a consistent copy; False if it was frozen
        already (paused: it stays so)."""
        if self.cgroups is None:
            return False
        cgroup = self.cgroups.sandbox(config.id)
        if (cgroup / "cgroup.freeze").read_text().strip() == "1":
            return False
        (cgroup / "cgroup.freeze").write_text("1")
        for _ in range(500):
            if "frozen 1" in (cgroup / "cgroup.events").read_text():
                break
            await asyncio.sleep(0.01)
        return True

    async def _thaw(self, config: SandboxConfig) -> None:
        assert self.cgroups is not None
        with contextlib.suppress(OSError):
            (self.cgroups.sandbox(config.id) / "cgroup.freeze").write_text("0")

    async def remove_snapshot(self, snapshot_id: str) -> None:
        self.snapshot_dir(snapshot_id)
        await asyncio.to_thread(snapshots.remove, self.snapshots_dir, snapshot_id)

    @staticmethod
    def _adopt_flat_layout(config: SandboxConfig) -> None:
        """Move the directories of a sandbox without a disk limit made by an earlier version
        (directly in its directory) to files/."""
        files = config.dir / "files"
        if files.exists() or not (config.dir / "workspace").is_dir():
            return
        files.mkdir()
        for name in ("etc", "etc.new", "usr-local", "workspace"):
            if os.path.lexists(config.dir / name):
                (config.dir / name).rename(files / name)

    def _seed_etc(self, etc: Path, root: int, template: Path) -> None:
        """A new sandbox's /etc: a template's own etc/ if it has one, the generated files, and
        links to the host's shown parts."""
        if etc.is_dir():
            return  # kept from an earlier start: root inside may have changed it
        seed = etc.with_name("etc.new")
        if seed.exists():
            shutil.rmtree(seed)
        if template != Path("/") and (template / "etc").is_dir():
            shutil.copytree(template / "etc", seed, symlinks=True)
            for path in seed.rglob("*"):
                os.chown(path, root, root, follow_symlinks=False)
        else:
            seed.mkdir()
        for name, text in ETC_FILES.items():
            (seed / name).write_text(text)
        for name in dict.fromkeys(HOST_ETC):
            if (Path("/etc") / name).exists() and not (seed / name).exists():
                (seed / name).symlink_to(f"{HOST_ETC_MOUNT}/{name}")
        for path in [seed, *seed.iterdir()]:
            os.chown(path, root, root, follow_symlinks=False)
        seed.chmod(0o755)
        seed.rename(etc)

    def _mount_disk(self, config: SandboxConfig, uid: int) -> None:
        """The sandbox's own ext4 file system of disk_mb MiB (sparse), loop-mounted."""
        disk, image = config.dir / "disk", config.dir / "disk.img"
        disk.mkdir(exist_ok=True)
        if os.path.ismount(disk):
            return
        size = config.limits.disk_mb
        assert size is not None
        if not image.exists() and self.spares.take(size, image, disk):
            os.chown(disk, uid, uid)  # made for no one in particular: the root is the user's
            return
        if not image.exists():
            with open(image, "wb") as f:
                f.truncate(size * 1024 * 1024)
            subprocess.run(mkfs_command(image, size, uid), check=True, capture_output=True)
        loop_mount(image, disk)
        lost = disk / "lost+found"
        if lost.is_dir():
            lost.rmdir()

    def unmount_disk(self, config: SandboxConfig) -> None:
        rootfs.unmount_root(self.root_layout(config))
        disk = config.dir / "disk"
        if os.path.ismount(disk):
            unmount(disk)

    async def remove_files(self, config: SandboxConfig) -> None:
        await asyncio.to_thread(self.unmount_disk, config)
        self._legacy.discard(config.id)
        # rmtree on Linux walks with file descriptors and never follows symlinks.
        await asyncio.to_thread(remove_tree, config.dir)

    async def close(self) -> None:
        await asyncio.to_thread(self.reaper.close)
        await self.sweep()
        await asyncio.to_thread(self.spares.close)
        for fd in self._namespaces.values():
            os.close(fd)
        self._namespaces.clear()
        await asyncio.to_thread(self.views.close)
        if self.cgroups is not None:
            self.cgroups.remove(self.cgroups.base)
        if self.resources is not None:
            self.resources.close()
        await self.net.close()

    async def sweep(self) -> None:
        await asyncio.to_thread(self._unmount_all)
        if self.skeletons_dir.exists() and not self._skeletons:
            await asyncio.to_thread(remove_tree, self.skeletons_dir)  # an earlier run's
        await asyncio.to_thread(snapshots.clean_staging, self.snapshots_dir)
        if self.cgroups is not None and self.cgroups.base.exists():
            for path in [p for p in self.cgroups.base.iterdir() if p.is_dir()]:
                if not await self.cgroups.kill_and_remove(path):
                    log.warning("could not remove leftover cgroup %s", path)
        if self.resources is not None:
            self.resources.sweep()

    def _unmount_all(self) -> None:
        """Unmount the sandbox and volume file systems an earlier run left mounted (a volume
        is mounted again when a sandbox attaches it)."""
        prefixes = tuple(str(self.data_dir / d) + "/" for d in ("sandboxes", "volumes"))
        for line in Path("/proc/self/mounts").read_text().splitlines():
            target = line.split()[1]
            if target.startswith(prefixes):
                unmount(target)


def _fresh_tmp(tmp: Path, uid: int) -> None:
    """/tmp on a sandbox's disk: empty at every start, as a tmpfs would be."""
    if tmp.exists():
        remove_tree(tmp)
    tmp.mkdir()
    os.chown(tmp, uid, uid)
    tmp.chmod(0o1777)


def remove_tree(path: Path) -> None:
    """Delete a directory tree the sandbox controlled. GNU rm walks it without recursion (a
    tree thousands of levels deep is fine) and never follows symlinks or leaves the file
    system."""
    if not os.path.lexists(path):
        return
    done = subprocess.run(
        ["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0 or os.path.lexists(path):
        raise OSError(f"could not remove {path}: {done.stderr.strip()[-500:]}")


def _pipe_with(data: bytes) -> int:
    """A pipe holding `data` (up to PIPE_SIZE: the pipe is grown to fit); returns the read
    end."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        if len(data) > 60000:
            fcntl.fcntl(w, F_SETPIPE_SZ, max(len(data), 65536))
        view = memoryview(data)
        while view:
            view = view[os.write(w, view) :]
    finally:
        os.close(w)
    return r


def start_time(pid: int) -> int:
    """A process's start time (clock ticks after boot): with its pid, who it is, even once the
    pid is reused."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        text = f.read()
    return int(text[text.rindex(b")") + 2 :].split()[19])


# Command cgroups a sandbox keeps for its next commands (command_cgroups.py): one serves a
# sandbox whose commands come one after another; a second, one whose commands overlap.
IDLE_CGROUPS_MAX = 2


class NamespacesSandbox(SandboxHandle):
    def __init__(
        self,
        runtime: NamespacesRuntime,
        config: SandboxConfig,
        proc: asyncio.subprocess.Process,
        sock: socket.socket,
        cgroup: Path | None,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.network = config.network
        self.proc = proc
        self.sock = sock
        self.cgroup = cgroup
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self._dead = asyncio.Event()
        self._spawns: dict[str, asyncio.Future[int]] = {}
        self._exits: dict[str, asyncio.Future[ExitStatus]] = {}
        self._stderr = b""
        self._home_fds: list[int] | None = None  # the sandbox's own cgroup.procs, opened once
        self._idle_cgroups: list[CommandCgroups] = []  # for the next commands (LIFO)
        self._cgroups_in_use = 0  # commands holding command cgroups now
        self._stopping = False
        # The host pid of its pid 1 and that process's start time (None until it has started):
        # whose /proc/PID/root its terminals come from.
        self.inner: tuple[int, int] | None = None
        # What the supervisor says is hostile input (frames.py): a budget, rate-limited
        # warnings, and the ids of commands it may speak of (asked, or recently done).
        self._budget = FrameBudget()
        self._warnings = WarningLog(log)
        self._done_ids: dict[str, None] = {}
        self._resume_reading: asyncio.TimerHandle | None = None
        self.netns_fd: int | None = None  # the sandbox's network namespace, once it exists
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._on_readable)
        self._watch = asyncio.ensure_future(self._watch_process())

    @property
    def alive(self) -> bool:
        return not self._dead.is_set()

    async def wait_dead(self) -> None:
        await self._dead.wait()

    async def startup_error(self) -> str:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._watch), 1.0)
        return self._stderr.decode(errors="replace").strip()[-2000:]

    async def _watch_process(self) -> None:
        assert self.proc.stderr is not None
        # Keep only the head of what bwrap prints: it explains failed starts.
        while chunk := await self.proc.stderr.read(65536):
            if len(self._stderr) < 8192:
                self._stderr += chunk[: 8192 - len(self._stderr)]
        await self.proc.wait()
        self._mark_dead()

    def _mark_dead(self) -> None:
        if self._dead.is_set():
            return
        self._dead.set()
        self._stop_reading()
        error = SandboxDied(self.failure or "the sandbox stopped")
        for fut in [self.ready, *self._spawns.values(), *self._exits.values()]:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # mark retrieved: nobody may be waiting any more

    def _on_readable(self) -> None:
        # A few messages per wake-up (the loop calls again while more wait), within the
        # sandbox's budget: a flooding supervisor slows itself down, not the node.
        for _ in range(FRAMES_PER_WAKE):
            delay = self._budget.wait()
            if delay:
                self._over_budget(delay)
                return
            try:
                data = self.sock.recv(MAX_FRAME + 1)  # SCM_RIGHTS sent along are discarded
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._mark_dead()
                return
            self._budget.spend(len(data))
            try:
                self._dispatch(parse_event(data))
            except ProtocolError as exc:
                self._broke_protocol(str(exc))
                return

    def _over_budget(self, delay: float) -> None:
        over = self._budget.over_for()
        if over > OVER_BUDGET_GRACE:
            self._broke_protocol(
                f"more than {self._budget.rate:.0f} messages or {self._budget.byte_rate:.0f} "
                f"bytes a second for {over:.0f} s"
            )
            return
        if over == 0:
            self._warnings.warning(
                "sandbox %s: its supervisor sends past its message budget; reading slowed down",
                self.config.id,
            )
        self._stop_reading()
        self._resume_reading = self.loop.call_later(max(delay, PAUSE), self._start_reading)

    def _start_reading(self) -> None:
        self._resume_reading = None
        if self.alive and self.failure is None:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _stop_reading(self) -> None:
        if self._resume_reading is not None:
            self._resume_reading.cancel()
            self._resume_reading = None
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())

    def _broke_protocol(self, reason: str) -> None:
        """Stop the sandbox: its supervisor is not the one the node started (or is broken)."""
        if self.failure is not None:
            return
        self.failure = f"the sandbox's supervisor broke its protocol ({reason}): sandbox stopped"
        self._warnings.warning("sandbox %s: %s", self.config.id, self.failure)
        self._stop_reading()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()  # its pid 1 (--die-with-parent) and the rest go with it

    def _forget(self, command_id: str) -> None:
        """The node is done with a command: late repeats about it are ignored, not errors."""
        self._spawns.pop(command_id, None)
        self._exits.pop(command_id, None)
        self._done_ids[command_id] = None
        if len(self._done_ids) > 1024:
            del self._done_ids[next(iter(self._done_ids))]

    def _dispatch(self, message: dict[str, Any]) -> None:
        """One event checked by parse_event."""
        ev = message["ev"]
        if ev == "ready":
            if not self.ready.done():
                self.ready.set_result(None)
            return
        cid = message["id"]
        if cid not in self._spawns and cid not in self._exits:
            if cid in self._done_ids:
                return
            raise ProtocolError(f"a {ev!r} event about a command it was not asked to run")
        if ev == "started":
            fut = self._spawns.pop(cid, None)
            if fut and not fut.done():
                fut.set_result(message["pid"])
        elif ev == "spawn_failed":
            fut = self._spawns.pop(cid, None)
            if fut and not fut.done():
                fut.set_exception(SpawnError(message["error"]))
        elif ev == "exit":
            efut = self._exits.get(cid)
            if efut and not efut.done():
                efut.set_result(ExitStatus(exit_code=message["code"], signal=message["signal"]))

    async def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE:
            raise SpawnError("command line and environment are too large")
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            if not self.alive:
                raise SandboxDied("the sandbox stopped")
            try:
                self.sock.sendmsg([data], anc)
                return
            except BlockingIOError:
                writable = self.loop.create_future()
                self.loop.add_writer(self.sock.fileno(), writable.set_result, None)
                try:
                    await asyncio.wait_for(writable, SPAWN_TIMEOUT)
                finally:
                    self.loop.remove_writer(self.sock.fileno())
            except OSError as exc:
                raise SandboxDied(f"the sandbox stopped: {exc}") from None

    async def spawn(self, spec: ProcessSpec) -> ProcessHandle:
        if not self.alive:
            raise SandboxDied("the sandbox is not running")
        if spec.tty:
            master, slave = self._open_pty(spec.rows, spec.cols)
            stdin_w, out_r, err_r = os.dup(master), master, None
            os.set_inheritable(stdin_w, False)
            host_fds = [stdin_w, out_r]
            child_fds = [slave, slave, slave]
        else:
            stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            for fd in (out_r, err_r):
                with contextlib.suppress(OSError):
                    fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            host_fds = [stdin_w, out_r, err_r]
            child_fds = [stdin_r, out_w, err_w]
        if self.config.image is not None:
            # HOME, USER and LOGNAME come from the image's passwd (the supervisor's).
            env = {"PATH": DEFAULT_ENV["PATH"], **self.config.env, **spec.env}
        elif spec.user == "root":
            # As sudo sets them: root's home, and who asked.
            env = {**DEFAULT_ENV, **self.config.env, **SUDO_ENV, **spec.env}
        elif spec.user != "user":
            # Another user of the sandbox's (sudo -u): who asked; HOME, USER and LOGNAME come
            # from the sandbox's passwd (the supervisor's).
            asked = {k: v for k, v in SUDO_ENV.items() if k.startswith("SUDO_")}
            env = {**DEFAULT_ENV, **self.config.env, **asked, **spec.env}
            for key in ("HOME", "USER", "LOGNAME"):
                if key not in self.config.env and key not in spec.env:
                    env.pop(key, None)
        else:
            env = {**DEFAULT_ENV, **self.config.env, **spec.env}
        if self.config.network != "none":
            env = {**TRUST_ENV, **env}
        argv = self.runtime.expand_argv(self.config, spec.argv)
        taken: CommandCgroups | None = None
        try:
            taken = self._idle_cgroups.pop() if self._idle_cgroups else self._make_cgroups()
            cgroups = taken
            cgroups.begin()
            home_fds = self._homes() if cgroups.join_fds else []
        except BaseException:
            if taken is not None:
                self.runtime.reaper.add(taken.remove)
            for fd in {*host_fds, *child_fds}:
                os.close(fd)
            raise
        cgroup, cgroup_fds = cgroups.unified, cgroups.join_fds
        started = self.loop.create_future()
        exited: asyncio.Future[ExitStatus] = self.loop.create_future()
        self._spawns[spec.id] = started
        self._exits[spec.id] = exited
        message = {
            "op": "spawn", "id": spec.id, "argv": argv,
            "env": env, "cwd": spec.cwd,
            "tty": spec.tty, "rlimits": {"core": 0, **spec.rlimits}, "user": spec.user,
            # The supervisor's launcher joins the command's cgroups to start it and goes back
            # to the sandbox's own.
            "joins": len(cgroup_fds), "homes": len(home_fds),
            "cgroup": cgroups.name if cgroup is not None else "",
        }  # fmt: skip
        self._cgroups_in_use += 1
        try:
            await self._send(message, child_fds + cgroup_fds + home_fds)
            if cgroup_fds and not self._idle_cgroups and self._cgroups_in_use > 1:
                # Commands overlap here: the next one's, made while the supervisor starts this.
                self.loop.call_soon(self._make_spare)
            try:
                pid = await asyncio.wait_for(started, SPAWN_TIMEOUT)
            except SandboxDied as exc:
                raise StartUnknown(str(exc)) from None
        except BaseException:
            self._cgroups_in_use -= 1
            self._forget(spec.id)
            for fd in host_fds:
                os.close(fd)
            if cgroup is not None and self.runtime.cgroups is not None:
                # A launcher killed mid-spawn may have started it after all.
                self.runtime.cgroups.kill(cgroup)
            self.runtime.reaper.add(cgroups.remove)  # once the killed ones are gone
            raise
        finally:
            for fd in set(child_fds):
                os.close(fd)
        process = NamespacesProcess(self, spec.id, pid, stdin_w, out_r, err_r, exited, cgroups)
        process.tty = spec.tty
        return process

    def _make_cgroups(self) -> CommandCgroups:
        """New command cgroups: a cgroup2 one (to kill the command's tree), and a v1 memory
        one (for its peak) where the host has that hierarchy."""
        runtime = self.runtime
        unified = self.cgroup if runtime.cgroups is not None else None
        memory = None
        if runtime.resources is not None and "memory" in runtime.resources.v1:
            memory = runtime.resources.v1["memory"] / self.config.id
        return CommandCgroups.make(unified, memory)

    def _make_spare(self) -> None:
        """Command cgroups for the next command, made while this one starts: the two mkdirs
        (~0.14 ms) leave the next exec's path."""
        if self._idle_cgroups or self._stopping or not self.alive:
            return
        try:
            self._idle_cgroups.append(self._make_cgroups())
        except OSError as exc:  # the next command makes its own
            log.debug("sandbox %s: no spare command cgroup: %s", self.config.id, exc)

    def _take_back(self, cgroups: CommandCgroups) -> bool:
        """A command's cgroups, after it ended: kept for the next command if they can serve
        it (False: the caller removes them)."""
        if self._stopping or not self.alive or len(self._idle_cgroups) >= IDLE_CGROUPS_MAX:
            return False
        if not cgroups.reusable():
            return False
        self._idle_cgroups.append(cgroups)
        return True

    def _open_pty(self, rows: int, cols: int) -> tuple[int, int]:
        """A terminal of the sandbox's own devpts instance, so that the command sees a terminal
        it can name (`tty`, ttyname); else, when that cannot be had, one of the host's."""
        if self.inner is not None and self.alive:
            pid, started = self.inner
            try:
                root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    if start_time(pid) != started:
                        raise OSError(errno.ESRCH, "the pid is another process's now")
                    owner = self.runtime.host_uid(self.config)
                    return open_pty_in(root, rows, cols, owner=owner)
                finally:
                    os.close(root)
            except OSError as exc:
                log.info("sandbox %s: a host terminal instead of its own: %s", self.config.id, exc)
        return open_pty(rows, cols)

    def _homes(self) -> list[int]:
        """Write-only fds of the sandbox's own cgroup.procs (cgroup2 and the v1 memory one)."""
        if self._home_fds is None:
            paths = []
            if self.runtime.cgroups is not None and self.cgroup is not None:
                paths.append(self.cgroup / "cgroup.procs")
            resources = self.runtime.resources
            if resources is not None and "memory" in resources.v1:
                paths.append(resources.v1["memory"] / self.config.id / "cgroup.procs")
            self._home_fds = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in paths]
        return self._home_fds

    def _close_homes(self) -> None:
        for fd in self._home_fds or []:
            os.close(fd)
        self._home_fds = None

    async def stop(self) -> None:
        self._stopping = True
        for idle in self._idle_cgroups:
            idle.close()  # their directories go with the sandbox's own
        self._idle_cgroups.clear()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()  # bwrap's --die-with-parent takes the whole pid namespace
        cgroups = self.runtime.cgroups
        if cgroups is not None and self.cgroup is not None:
            with contextlib.suppress(OSError):
                (self.cgroup / "cgroup.freeze").write_text("0")  # a paused sandbox dies too
            if not await cgroups.kill_and_remove(self.cgroup):
                log.warning("cgroup %s still busy after stop", self.cgroup)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._watch), 5.0)
        if self.runtime.resources is not None:
            self.runtime.resources.remove(self.config.id)
        await asyncio.to_thread(self.runtime.unmount_disk, self.config)
        if self.network != "none":
            await self.runtime.net.detach(self.config.slot)
            self.network = "none"
        self._mark_dead()
        self._close_homes()
        self.sock.close()
        if self.netns_fd is not None:
            os.close(self.netns_fd)
            self.netns_fd = None

    async def connect_port(self, port: int) -> socket.socket:
        if self.netns_fd is None or not self.alive:
            raise SandboxDied("the sandbox is not running")
        return await ports.connect(self.netns_fd, port)

    async def set_network(
        self, network: str, allow: tuple[str, ...], inject: tuple[Injection, ...] = ()
    ) -> None:
        if network == "none" or self.network == "none":
            raise NeedsRestart("switching to or from network 'none' restarts the sandbox")
        await self.runtime.net.update(self.config.slot, network, list(allow), inject)
        self.network = network

    async def network_status(self) -> dict[str, Any]:
        if self.network == "none" or not self.alive:
            return {}
        return await self.runtime.net.status(self.config.slot)

    async def pause(self) -> None:
        await self._freeze(True)

    async def resume(self) -> None:
        await self._freeze(False)

    async def _freeze(self, frozen: bool) -> None:
        if self.runtime.cgroups is None or self.cgroup is None:
            raise RuntimeError("pausing needs cgroup2 (cgroup.freeze), which this host lacks")
        (self.cgroup / "cgroup.freeze").write_text("1" if frozen else "0")
        want = "frozen 1" if frozen else "frozen 0"
        for _ in range(500):  # freezing completes asynchronously
            if want in (self.cgroup / "cgroup.events").read_text():
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("the sandbox did not reach the frozen state in time")


class NamespacesProcess(ProcessHandle):
    def __init__(
        self,
        sandbox: NamespacesSandbox,
        command_id: str,
        pid: int,
        stdin_fd: int,
        stdout_fd: int,
        stderr_fd: int | None,
        exited: asyncio.Future[ExitStatus],
        cgroups: CommandCgroups,
    ) -> None:
        self.sandbox = sandbox
        self.command_id = command_id
        self.cgroups = cgroups  # its own until release(), then maybe the next command's
        self.pid = pid  # inside the sandbox's pid namespace
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self._exited = exited
        self.cgroup = cgroups.unified
        self._released = False

    async def wait(self) -> ExitStatus:
        return await asyncio.shield(self._exited)

    async def signal(self, signum: int) -> None:
        cgroups = self.sandbox.runtime.cgroups
        if cgroups is not None and self.cgroup is not None:
            cgroups.signal_all(self.cgroup, signum)
        else:
            with contextlib.suppress(SandboxDied):
                await self.sandbox._send({"op": "signal", "id": self.command_id, "sig": signum})

    async def signal_group(self, signum: int) -> None:
        with contextlib.suppress(SandboxDied):
            await self.sandbox._send({"op": "signal", "id": self.command_id, "sig": signum})

    async def kill_tree(self) -> None:
        cgroups = self.sandbox.runtime.cgroups
        if cgroups is not None and self.cgroup is not None:
            cgroups.kill(self.cgroup)
        else:
            await self.signal(signal.SIGKILL)

    def usage(self) -> Usage:
        if self.sandbox.runtime.resources is None:
            return Usage()
        return self.cgroups.usage()

    async def release(self) -> None:
        self.sandbox._forget(self.command_id)
        if self._released:
            return
        self._released = True
        self.sandbox._cgroups_in_use -= 1
        # From here on its cgroups may be another command's: nothing of this one touches them.
        unified, self.cgroup = self.cgroup, None
        if unified is None:
            self.cgroups.close()  # without cgroup2 the v1 one goes with the sandbox's own
            return
        if not self.sandbox._take_back(self.cgroups):
            # rmdir of a cgroup waits in the kernel: removed by the reaper's thread, in batches.
            self.sandbox.runtime.reaper.add(self.cgroups.remove)
