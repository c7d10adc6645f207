"""The .deb packages the tests build (tests/deb_packages.py) are what dpkg expects."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deb_packages import HELLO, DebSpec, build_deb


def dpkg_deb(*args: str | Path) -> str:
    return subprocess.run(
        ["dpkg-deb", *map(str, args)], check=True, capture_output=True, text=True, timeout=30
    ).stdout


def test_the_hello_package_has_its_program_and_postinst(tmp_path: Path) -> None:
    deb = build_deb(tmp_path, HELLO)
    assert deb.name == "corral-hello_1.0_all.deb"
    assert dpkg_deb("--field", deb, "Package", "Version", "Architecture").splitlines() == [
        "Package: corral-hello", "Version: 1.0", "Architecture: all",
    ]  # fmt: skip
    contents = dpkg_deb("--contents", deb)
    line = next(x for x in contents.splitlines() if x.endswith("./usr/bin/corral-hello"))
    assert line.startswith("-rwxr-xr-x root/root")
    control = subprocess.run(
        ["sh", "-c", f"dpkg-deb --ctrl-tarfile {deb} | tar -t"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.split()  # fmt: skip
    assert "./postinst" in control


def test_the_same_spec_builds_the_same_bytes(tmp_path: Path) -> None:
    a = build_deb(tmp_path / "a", HELLO).read_bytes()
    b = build_deb(tmp_path / "b", HELLO).read_bytes()
    assert a == b


def test_depends_and_files_are_written(tmp_path: Path) -> None:
    spec = DebSpec("corral-extra", "2.1", depends=("corral-hello (>= 1.0)",),
                   files={"/etc/corral-extra.conf": b"x=1\n"})  # fmt: skip
    deb = build_deb(tmp_path, spec)
    assert dpkg_deb("--field", deb, "Depends").strip() == "corral-hello (>= 1.0)"
    assert "-rw-r--r-- root/root" in next(
        x for x in dpkg_deb("--contents", deb).splitlines() if x.endswith("corral-extra.conf")
    )
