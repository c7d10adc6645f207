"""Starting the node-trusted processes of a sandbox (its supervisor) on code the sandbox's root
cannot change.

The sandbox's root owns the sandbox's /etc and /usr/local. glibc's loader reads
/etc/ld.so.preload in every dynamically linked process, with no flag to turn it off, and
/etc/ld.so.cache unless started with --inhibit-cache; Python reads .pth files, sitecustomize and
usercustomize from /usr/local unless started with -S, and PYTHON* variables unless -I.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from pathlib import Path

PT_INTERP = 3
MAX_INTERP = 4096


def elf_interpreter(path: Path) -> str | None:
    """The program interpreter (PT_INTERP) an ELF executable names, e.g. glibc's loader; None
    for a static or unreadable file."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF":
                return None
            wide, order = header[4] == 2, "<" if header[5] == 1 else ">"
            if wide:
                (phoff,) = struct.unpack_from(order + "Q", header, 32)
                phentsize, phnum = struct.unpack_from(order + "HH", header, 54)
            else:
                (phoff,) = struct.unpack_from(order + "I", header, 28)
                phentsize, phnum = struct.unpack_from(order + "HH", header, 42)
            for index in range(phnum):
                f.seek(phoff + index * phentsize)
                entry = f.read(phentsize)
                if struct.unpack_from(order + "I", entry, 0)[0] != PT_INTERP:
                    continue
                # p_offset and p_filesz
                word, at = ("Q", (8, 32)) if wide else ("I", (4, 16))
                offset, size = (struct.unpack_from(order + word, entry, i)[0] for i in at)
                f.seek(offset)
                return f.read(min(size, MAX_INTERP)).split(b"\0")[0].decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def trusted_python(root: Path, python: str, *args: str) -> list[str]:
    """The command line that runs `python` (a path inside the sandbox, under /usr) with `args`
    on code from the read-only /usr only, the sandbox's file system being made of `root`/usr.

    glibc's loader, started by its path with --inhibit-cache, takes libraries from its built-in
    system directories (/lib/<arch>, /usr/lib/<arch>, /lib, /usr/lib: all the read-only /usr
    inside) and never from a cache the sandbox's ldconfig rebuilt; the option is not inherited,
    so commands keep the sandbox's cache. sys.executable stays `python` (the loader passes it
    as argv[0]). -I ignores PYTHON* variables and keeps the script's directory and the user
    site off sys.path; -S skips site (.pth files, sitecustomize, usercustomize)."""
    command = [python, "-I", "-S", *args]
    loader = elf_interpreter(root / python.lstrip("/"))
    if loader is None or not Path(loader).name.startswith("ld-linux"):
        return command  # not glibc's loader (or none): it takes no --inhibit-cache
    inside = loader.lstrip("/")
    # /bin, /lib, /lib64 and /sbin are links into usr/ inside the sandbox.
    host = root / (inside if inside.startswith("usr/") else "usr/" + inside)
    if not host.exists():
        return command
    return [loader, "--inhibit-cache", *command]


def clear_mount_point(etc: Path, name: str, owner: int) -> None:
    """Make `etc`/`name` (in a sandbox's /etc, which its root controls) an empty regular file
    owned by `owner`, for bwrap to mount over: a symlink or directory there would make bwrap
    fail (or mount elsewhere). Runs while the sandbox is stopped; never follows a link."""
    path = etc / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not (stat.S_ISREG(st.st_mode) and st.st_size == 0):
        if stat.S_ISDIR(st.st_mode):
            # GNU rm: no recursion limit, never follows symlinks or leaves the file system.
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)
        else:
            os.unlink(path)
        st = None
    if st is None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.fchown(fd, owner, owner)
        finally:
            os.close(fd)


def host_python(mount: str, python: str, *args: str) -> list[str]:
    """The command line that runs the host's `python` (a host path under /usr) in a sandbox
    whose root is not the host's: the host's /usr is shown read-only at `mount` + "/usr", and
    glibc's loader from there takes libraries from there only (never the image's own /lib,
    which its root may change, nor its cache). The interpreter finds its standard library
    next to itself."""
    return [*host_interpreter(mount, python), "-I", "-S", *args]


def host_interpreter(mount: str, python: str) -> list[str]:
    """The start of host_python's command line: the loader and the interpreter, no options."""
    real_python = os.path.realpath(python)
    inside_python = mount + real_python
    loader = elf_interpreter(Path(real_python))
    if loader is None:
        return [inside_python]
    real_loader = os.path.realpath(loader)
    if not real_loader.startswith("/usr/"):
        return [inside_python]
    libdirs = dict.fromkeys([os.path.dirname(real_loader), "/usr/lib"])
    return [
        mount + real_loader, "--inhibit-cache",
        "--library-path", ":".join(mount + d for d in libdirs), inside_python,
    ]  # fmt: skip
