"""Small images made of the host's own programs and the libraries they load, for tests of
image roots that need no registry and no network.

`host_tools_layer(*programs)` is a layer of those programs at their paths (with the symlinks
on the way); `shell_layer()` is bash alone; `host_image()` is a whole root: the usual layout,
users root, user (1000), _apt (42) and web (33), a directory owned by 42, an Env and a
WorkingDir."""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from tests.oci_images import BuiltImage

PROGRAMS = (
    "bash", "ls", "id", "cat", "touch", "stat", "mkdir", "rm", "echo", "sleep", "head", "dd",
    "chown", "ln", "mv", "sync", "readlink",
)  # fmt: skip
PASSWD = (
    "root:x:0:0:root:/root:/bin/bash\n"
    "web:x:33:33:www-data:/var/www:/bin/bash\n"
    "_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\n"
    "user:x:1000:1000::/home/user:/bin/bash\n"
    "far:x:5000:5000::/home/far:/bin/bash\n"
)
GROUP = "root:x:0:\nwww-data:x:33:\nuser:x:1000:\n"


def host_tools_layer(*programs: str) -> bytes:
    """A layer with the host's own programs and the libraries they load, at their paths (with
    the symlinks on the way): a root with a shell, without a base image from elsewhere."""
    files: set[Path] = set()
    links: dict[Path, str] = {}

    def add(path: Path) -> None:
        path = Path(os.path.realpath(path.parent)) / path.name  # the dirs as they really are
        if path.is_symlink():
            links[path] = os.readlink(path)
            add(path.parent / links[path])
        else:
            files.add(path)

    for program in programs:
        found = shutil.which(program)
        assert found is not None, program
        add(Path(found))
        linked = subprocess.run(["ldd", found], capture_output=True, text=True, check=True)
        for token in linked.stdout.split():
            if token.startswith("/"):
                add(Path(token))
    for name in ("bin", "lib", "lib64", "sbin"):  # a merged /usr's links
        if Path("/", name).is_symlink():
            links[Path("/", name)] = os.readlink(Path("/", name))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        everything = files | set(links)
        for d in sorted({p for f in everything for p in f.parents if p != Path("/")} - set(links)):
            info = tarfile.TarInfo(str(d).lstrip("/"))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for link, target in sorted(links.items()):
            info = tarfile.TarInfo(str(link).lstrip("/"))
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for f in sorted(files):
            tar.add(f, arcname=str(f).lstrip("/"), recursive=False)
    return buf.getvalue()


@functools.cache
def shell_layer() -> bytes:
    """bash, for images whose sandboxes run shell commands (a sandbox's root is its image's)."""
    return host_tools_layer("bash")


def host_image() -> BuiltImage:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, *, data: bytes = b"", mode: int = 0o755,
                uid: int = 0) -> None:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, uid, 1
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        for name in ("etc", "tmp", "var", "var/cache", "var/www", "root", "home", "workspace"):
            add(name, tarfile.DIRTYPE)
        add("var/cache/apt-owned", tarfile.DIRTYPE, uid=42)
        add("etc/passwd", tarfile.REGTYPE, data=PASSWD.encode(), mode=0o644)
        add("etc/group", tarfile.REGTYPE, data=GROUP.encode(), mode=0o644)
        add("etc/os-release", tarfile.REGTYPE, data=b"ID=corral-test\n", mode=0o644)
    return BuiltImage(
        [host_tools_layer(*PROGRAMS), buf.getvalue()],
        config={"Env": ["PATH=/usr/bin:/bin", "FROM_IMAGE=1"], "WorkingDir": "/workspace"},
    )
