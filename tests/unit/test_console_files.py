"""The web console's files: all of them go into the wheel, none loads anything from elsewhere,
and the vendored libraries are the versions their lock file pins."""

from __future__ import annotations

import json
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import corral

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(corral.__file__).parent
STATIC = PACKAGE / "api" / "console" / "static"


def test_every_console_file_is_package_data() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["corral"]
    files = [p.relative_to(PACKAGE).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert len(files) > 10

    # fnmatch's * crosses slashes where setuptools' does not: compare segment by segment.
    def covered(path: str) -> bool:
        parts = path.split("/")
        return any(
            len(pattern.split("/")) == len(parts)
            and all(fnmatch(a, b) for a, b in zip(parts, pattern.split("/"), strict=True))
            for pattern in patterns
        )

    assert [f for f in files if not covered(f)] == []


def test_no_file_loads_from_another_origin() -> None:
    for path in STATIC.rglob("*"):
        if path.suffix not in (".html", ".css") and not (
            path.suffix == ".js" and "vendor" not in path.parts
        ):
            continue
        text = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), path
        assert not re.search(r"""(import|from)\s*\(?\s*["'](https?:)?//""", text), path
        assert not re.search(r"url\(\s*['\"]?(https?:)?//", text), path
        assert "<script>" not in text, path  # no inline script (the policy would refuse it)


def test_vendored_versions_match_the_lock_file() -> None:
    lock = json.loads((ROOT / "scripts" / "console-vendor" / "package-lock.json").read_text())
    shipped = dict(
        line.split(" ") for line in (STATIC / "vendor" / "VERSIONS").read_text().splitlines()
    )
    for name, version in shipped.items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert set(shipped) == {"@xterm/xterm", "@xterm/addon-fit"}
    for directory in ("xterm", "addon-fit"):
        assert (
            "Permission is hereby granted, free of charge"
            in (STATIC / "vendor" / directory / "LICENSE").read_text()
        )


def test_the_tokens_page_offers_every_scope() -> None:
    from corral.core.models import Scope

    page = (STATIC / "js" / "pages" / "tokens.js").read_text()
    listed = re.search(r"const SCOPES = \[([^\]]*)\]", page)
    assert listed, "tokens.js has no SCOPES list"
    offered = re.findall(r'"([a-z_]+)"', listed.group(1))
    assert sorted(offered) == sorted(s.value for s in Scope)
