"""The web console in a real browser: Debian's Chromium (never a downloaded build), driven by
Playwright, against a real server with real sandboxes. One server, one browser and one signed-in
page per module; screenshots go to tests/browser/screenshots/ (not committed)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, Page, sync_playwright

from tests.conftest import Server, make_data_dir

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).parent / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# Without the background-networking flags Chromium dials out at start (updates, sync, field
# trials), which this machine refuses; QUIC and the GPU are of no use headless.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def console_server() -> Iterator[Server]:
    data_dir = make_data_dir("corral-test-console-")
    srv = Server(data_dir)
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser_context(console_server: Server) -> Iterator[BrowserContext]:
    if not CHROMIUM.exists():  # a failure, not a skip: setup installs it
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (Debian's chromium package)")
    SHOTS.mkdir(exist_ok=True)
    profile = tempfile.mkdtemp(prefix="corral-chromium-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport=DESKTOP,
            accept_downloads=True,
            base_url=console_server.url,
        )
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def shot(page: Page, name: str) -> Path:
    """A screenshot of the page as it is, without passing notices."""
    path = SHOTS / f"{name}.png"
    page.evaluate("document.getElementById('flash').replaceChildren()")
    page.screenshot(path=str(path))
    return path
