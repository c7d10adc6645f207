"""pytest fixtures for the Debian test image (tests/debian_image.py) and the local .deb
(tests/deb_packages.py); loaded by tests/conftest.py.

    def test_x(debian_image: DebianImage, corral_hello_deb: Path, registry: Registry):
        ref = debian_image.push(f"{registry.host}/corral/debian:bookworm")

A test that uses `debian_image` gets the mark `debian_image` (deselect with
`-m "not debian_image"` where the Debian mirror is out of reach and the cache is empty). A first
build takes a minute or two, longer than one test's timeout: when any selected test uses the
image, it is built (or found in the cache) once, after collection and before the first test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.deb_packages import HELLO, build_deb
from tests.debian_image import DebianImage, DebianImageError
from tests.debian_image import debian_image as build_image

FIXTURE = "debian_image"
_built: dict[str, DebianImage | str] = {}  # "image": the image, or "error": why there is none


def _uses_image(item: pytest.Item) -> bool:
    return FIXTURE in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _uses_image(item):
            item.add_marker(pytest.mark.debian_image)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly or not any(map(_uses_image, session.items)):
        return
    if os.geteuid() != 0:
        _built["error"] = "the Debian test image is built as root (mmdebstrap --mode=root)"
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("preparing the Debian test image (cached after the first build)")
    try:
        _built["image"] = build_image()
    except (DebianImageError, OSError) as e:
        _built["error"] = str(e)


@pytest.fixture(scope="session")
def debian_image() -> DebianImage:
    """The cached Debian bookworm test image (an OCI layout); `.push(ref)` sends it to a
    registry."""
    image = _built.get("image")
    if isinstance(image, DebianImage):
        return image
    error = _built.get("error")
    if error is None:  # not prepared after collection (a plugin reordered hooks): build now
        return build_image()
    if os.geteuid() != 0:
        pytest.skip(str(error))
    pytest.fail(f"the Debian test image could not be built: {error}", pytrace=False)


@pytest.fixture(scope="session")
def corral_hello_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """corral-hello_1.0_all.deb (tests/deb_packages.py HELLO): installs /usr/bin/corral-hello;
    its postinst writes HELLO_MARKER."""
    return build_deb(tmp_path_factory.mktemp("debs"), HELLO)
