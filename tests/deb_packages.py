"""Small Debian packages built by the tests themselves with `dpkg-deb`, to install in a sandbox
with `apt-get install -y ./name.deb` without any network.

    deb = build_deb(tmp_path, HELLO)   # tmp_path/corral-hello_1.0_all.deb

`HELLO` (package `corral-hello`) installs /usr/bin/corral-hello, which prints HELLO_OUTPUT, and
its postinst writes HELLO_MARKER, so a test can tell that dpkg ran the maintainer script.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SOURCE_DATE_EPOCH = 1_700_000_000  # fixed file times: the same spec gives the same .deb


@dataclass(frozen=True)
class DebSpec:
    name: str
    version: str = "1.0"
    description: str = "a test package"
    depends: tuple[str, ...] = ()
    files: dict[str, bytes] = field(default_factory=dict)  # absolute path -> content
    executables: tuple[str, ...] = ()  # paths in files made mode 0755
    postinst: str | None = None  # a shell script body

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_all.deb"


HELLO_OUTPUT = "hello from corral-hello"
HELLO_MARKER = "/var/lib/corral-hello/installed"
HELLO = DebSpec(
    name="corral-hello",
    description="prints a greeting (a package the tests install)",
    files={"/usr/bin/corral-hello": f"#!/bin/sh\necho '{HELLO_OUTPUT}'\n".encode()},
    executables=("/usr/bin/corral-hello",),
    postinst=(
        'if [ "$1" = configure ]; then\n'
        f"  mkdir -p {os.path.dirname(HELLO_MARKER)}\n"
        f'  echo "configured $2" > {HELLO_MARKER}\n'
        "fi\n"
    ),
)


def build_deb(out_dir: Path, spec: DebSpec = HELLO) -> Path:
    """Build `spec` into out_dir/<name>_<version>_all.deb (files owned by root:root)."""
    tree = out_dir / f"{spec.name}.tree"
    control_dir = tree / "DEBIAN"
    control_dir.mkdir(parents=True)
    for path, data in spec.files.items():
        target = tree / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(0o755 if path in spec.executables else 0o644)
    control = [
        f"Package: {spec.name}",
        f"Version: {spec.version}",
        "Architecture: all",
        "Maintainer: Corral tests <tests@corral.invalid>",
        "Section: misc",
        "Priority: optional",
        *([f"Depends: {', '.join(spec.depends)}"] if spec.depends else []),
        f"Description: {spec.description}",
    ]
    (control_dir / "control").write_text("\n".join(control) + "\n")
    if spec.postinst is not None:
        script = control_dir / "postinst"
        script.write_text("#!/bin/sh\nset -e\n" + spec.postinst)
        script.chmod(0o755)
    for p in [tree, *tree.rglob("*")]:
        os.utime(p, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH), follow_symlinks=False)
    deb = out_dir / spec.filename
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
        check=True, capture_output=True, timeout=60,
        env={**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)},
    )  # fmt: skip
    return deb
