"""A small image made of the host's own programs (bash, coreutils) and their libraries, for
tests of image roots that need no registry and no network: one layer with the usual root
layout, users root, user (1000), _apt (42) and web (33), a directory owned by 42, and an
Env and WorkingDir."""

from __future__ import annotations

import io
import os
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


def _libraries(program: str) -> set[str]:
    out = subprocess.run(["ldd", program], capture_output=True, text=True).stdout
    return {word for line in out.splitlines() for word in line.split() if word.startswith("/")}


def _inside(host_path: str) -> str:
    """Where a host file goes in the image: /bin, /lib and /lib64 are links into usr/."""
    rel = host_path.lstrip("/")
    return "usr/" + rel if rel.split("/")[0] in ("bin", "lib", "lib64", "sbin") else rel


def host_image() -> BuiltImage:
    files: set[str] = set()
    for name in PROGRAMS:
        program = f"/usr/bin/{name}"
        files |= {program, *_libraries(program)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, *, data: bytes = b"", mode: int = 0o755, uid: int = 0,
                link: str = "") -> None:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, uid, 1
            info.linkname, info.size = link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        dirs = {"etc", "tmp", "var", "var/cache", "var/www", "root", "home", "usr/sbin"}
        for path in files:
            parts = Path(_inside(path)).parts[:-1]
            dirs |= {"/".join(parts[: k + 1]) for k in range(len(parts))}
        for name in sorted(dirs):
            add(name, tarfile.DIRTYPE)
        add("var/cache/apt-owned", tarfile.DIRTYPE, uid=42)
        for name in ("bin", "lib", "lib64", "sbin"):
            add(name, tarfile.SYMTYPE, link=f"usr/{name}")
        added = set()
        for path in sorted(files):
            inside = _inside(path)
            real = os.path.realpath(path)
            if inside in added:
                continue
            added.add(inside)
            if os.path.islink(path) and _inside(real) != inside:
                add(inside, tarfile.SYMTYPE, link=os.readlink(path))
                if _inside(real) not in added:
                    added.add(_inside(real))
                    add(_inside(real), tarfile.REGTYPE, data=Path(real).read_bytes())
            else:
                add(inside, tarfile.REGTYPE, data=Path(real).read_bytes())
        add("etc/passwd", tarfile.REGTYPE, data=PASSWD.encode(), mode=0o644)
        add("etc/group", tarfile.REGTYPE, data=GROUP.encode(), mode=0o644)
        add("etc/os-release", tarfile.REGTYPE, data=b"ID=corral-test\n", mode=0o644)
    return BuiltImage(
        [buf.getvalue()],
        config={"Env": ["PATH=/usr/bin:/bin", "FROM_IMAGE=1"], "WorkingDir": "/workspace"},
    )
