"""The web console, in headless Chromium and over plain HTTP: sign-in, a sandbox's life from
create to delete, live command output, the terminal, a directory up and down; and the security
of its assets, its cookie and its CSRF check."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page

from tests.browser.conftest import PHONE, shot
from tests.conftest import Server

pytestmark = pytest.mark.sandbox

SIGNED_IN: dict[str, Any] = {}


@pytest.fixture(scope="module")
def page(browser_context: BrowserContext, console_server: Server) -> Iterator[Page]:
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    assert not errors, errors  # no script error on any page, CSP refusals included
    page.close()


def signed_in(page: Page, console_server: Server) -> Page:
    if not SIGNED_IN:
        page.goto("/console")
        page.fill("#token", console_server.admin_key)
        page.click("#signin button[type=submit]")
        page.wait_for_selector("#create-sandbox")
        SIGNED_IN["yes"] = True
    return page


@pytest.fixture(scope="module")
def sandbox(page: Page, console_server: Server) -> Iterator[dict[str, str]]:
    """A sandbox made through the create form (the test of creating checks it)."""
    signed_in(page, console_server)
    page.goto("/console#/sandboxes")
    page.fill("#create-sandbox input[name=name]", "console-box")
    page.fill("#create-sandbox input[name=memory_mb]", "512")
    page.fill("#create-sandbox input[name=ttl_seconds]", "600")
    page.click("#create-sandbox button[type=submit]")
    link = page.wait_for_selector("#sandbox-list a:has-text('console-box')")
    href = link.get_attribute("href")
    box = {"id": href.rsplit("/", 1)[1], "name": "console-box"}
    yield box
    with console_server.client() as api:
        api.delete(f"/v1/sandboxes/{box['id']}")


# --- in the browser ----------------------------------------------------------------------------


@pytest.mark.browser
def test_sign_in_refuses_a_bad_token_then_signs_in(page: Page, console_server: Server) -> None:
    page.goto("/console")
    page.wait_for_selector("#signin")
    shot(page, "sign-in")
    page.fill("#token", "crl_not_a_token")
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#signin .error:has-text('not valid')")
    assert not [c for c in page.context.cookies() if c["name"] == "corral_console"]
    signed_in(page, console_server)
    cookie = next(c for c in page.context.cookies() if c["name"] == "corral_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # The page's scripts cannot read it.
    assert "corral_console" not in page.evaluate("document.cookie")


@pytest.mark.browser
def test_create_sandbox(page: Page, sandbox: dict[str, str], console_server: Server) -> None:
    row = page.locator("#sandbox-list tr", has_text="console-box")
    assert row.locator(".badge").inner_text() == "running"
    assert "local" in row.inner_text()
    shot(page, "sandboxes")
    with console_server.client() as api:
        made = api.get(f"/v1/sandboxes/{sandbox['id']}").json()
    assert made["name"] == "console-box" and made["memory_mb"] == 512
    assert made["ttl_seconds"] == 600


@pytest.mark.browser
def test_command_output_arrives_while_it_runs(page: Page, sandbox: dict[str, str]) -> None:
    page.goto(f"/console#/sandboxes/{sandbox['id']}/commands")
    # The command waits for a file the test writes only once the first line is on screen:
    # the page must show output before the command ends.
    page.fill(
        "#command",
        "echo first; while [ ! -e /workspace/go ]; do sleep 0.05; done; echo second; echo oops >&2",
    )
    page.click("#run-command button")
    page.wait_for_selector("#output:has-text('first')")
    assert "second" not in page.inner_text("#output")
    assert page.get_attribute("#output-status", "data-done") is None
    page.fill("#command", "touch /workspace/go")
    # (a second command from the same form: its output replaces the first one's)
    with page.expect_response(re.compile(r"/commands$")):
        page.click("#run-command button")
    page.wait_for_selector("#output-status[data-done]")
    page.locator("#history a", has_text="echo first").click()
    page.wait_for_selector("#output .stderr:has-text('oops')")
    assert page.inner_text("#output").startswith("first\nsecond\n")
    page.wait_for_selector("#output-status:has-text('completed, exit 0')")
    shot(page, "commands")


@pytest.mark.browser
def test_terminal_echoes_what_is_typed_and_follows_resize(
    page: Page, sandbox: dict[str, str]
) -> None:
    page.goto(f"/console#/sandboxes/{sandbox['id']}/terminal")
    page.wait_for_selector("#terminal-status[data-connected]")
    page.wait_for_selector(".xterm-rows:has-text('$')")  # the prompt
    page.keyboard.type("echo typed-$((6*7)); stty size\n")
    rows = page.locator(".xterm-rows")
    rows.filter(has_text="typed-42").wait_for()
    text = rows.inner_text()
    assert "echo typed-$((6*7))" in text  # the terminal's echo of the keys
    size = re.search(r"^(\d+) (\d+)\s*$", text, re.M)
    assert size, text
    shot(page, "terminal")
    # A narrower window: the terminal refits and the sandbox's terminal gets the new size.
    page.set_viewport_size({"width": 700, "height": 800})
    page.wait_for_timeout(300)
    page.keyboard.type("clear; stty size\n")
    page.wait_for_function(
        "prev => { const m = document.querySelector('.xterm-rows').innerText"
        ".match(/^(\\d+) (\\d+)\\s*$/m); return m && m[2] !== prev; }",
        arg=size.group(2),
    )
    page.set_viewport_size({"width": 1280, "height": 800})


@pytest.mark.browser
def test_upload_a_directory_and_download_it(
    page: Page, sandbox: dict[str, str], console_server: Server, tmp_path: Path
) -> None:
    local = tmp_path / "project"
    (local / "src" / "deep").mkdir(parents=True)
    (local / "README.txt").write_text("hello from the browser\n")
    (local / "src" / "deep" / "data.bin").write_bytes(bytes(range(256)) * 40)
    page.goto(f"/console#/sandboxes/{sandbox['id']}/files")
    page.wait_for_selector("#file-list")
    page.set_input_files("#upload-dir", str(local))
    page.locator("#file-list a.dir", has_text="project/").click()
    page.wait_for_selector("#file-list td:has-text('README.txt')")
    assert page.input_value("#file-path") == "/workspace/project"
    with console_server.client() as api:
        got = api.get(
            f"/v1/sandboxes/{sandbox['id']}/files",
            params={"path": "/workspace/project/src/deep/data.bin"},
        )
        assert got.status_code == 200 and got.content == bytes(range(256)) * 40
    shot(page, "files")
    with page.expect_download() as info:
        page.click("#download-dir")
    archive = info.value
    assert archive.suggested_filename == "project.tar.gz"
    with tarfile.open(archive.path(), "r:gz") as tar:
        names = {m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()}
        assert names == {"README.txt", "src/deep/data.bin"}
        readme = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("README.txt")))
        assert readme is not None and readme.read() == b"hello from the browser\n"
    # Files on their own, up into the directory shown and down as themselves.
    (tmp_path / "notes.txt").write_bytes(b"\x00binary\xffnotes")
    page.set_input_files("#upload-files", str(tmp_path / "notes.txt"))
    page.wait_for_selector("#file-list td:has-text('notes.txt')")
    with console_server.client() as api:
        got = api.get(
            f"/v1/sandboxes/{sandbox['id']}/files",
            params={"path": "/workspace/project/notes.txt"},
        )
        assert got.content == b"\x00binary\xffnotes"
    with page.expect_download() as info:
        page.locator("#file-list tr", has_text="README.txt").locator("a.button").click()
    assert Path(info.value.path()).read_bytes() == b"hello from the browser\n"


@pytest.mark.browser
def test_other_pages_and_the_phone_layout(
    page: Page, sandbox: dict[str, str], console_server: Server
) -> None:
    # A snapshot taken from the sandbox's page shows on the snapshots page.
    page.goto(f"/console#/sandboxes/{sandbox['id']}/commands")
    with page.expect_response(re.compile(r"/snapshots$")) as taken:
        page.click(".page-head button[data-action=snapshot]")
    assert taken.value.status == 201
    snapshot = taken.value.json()["id"]
    page.goto("/console#/images")
    row = page.locator("#snapshot-list tr", has_text=snapshot)
    assert sandbox["id"] in row.inner_text()
    shot(page, "images")
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button", has_text="delete").click()
    row.wait_for(state="detached")
    for name, ready in (
        ("images", "#snapshot-list"),
        ("nodes", "#node-list td:has-text('local')"),
        ("tokens", "#token-list"),
        ("audit", "#audit-list > *"),
    ):
        page.goto(f"/console#/{name}")
        page.wait_for_selector(ready)
        if name != "images":
            shot(page, name)
    with console_server.client() as api:
        audit = api.get("/v1/audit").status_code
    if audit == 404:
        page.goto("/console#/audit")
        page.wait_for_selector("#audit-unavailable:has-text('not available on this server')")
    else:
        page.goto("/console#/audit")
        page.wait_for_selector("#audit-list table")
    # A phone-sized screen: the menu folds, tables stack, nothing scrolls sideways.
    page.set_viewport_size(PHONE)
    try:
        for route, ready in (
            ("#/sandboxes", "#sandbox-list tbody tr"),
            (f"#/sandboxes/{sandbox['id']}/commands", "#history"),
        ):
            page.goto(f"/console{route}")
            page.wait_for_selector(ready)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            shot(
                page,
                "phone-" + route.strip("#/").split("/")[0] + ("-one" if "/" in route[2:] else ""),
            )
        assert not page.is_visible("#nav a[data-page=nodes]")
        page.click("#menu")
        assert page.is_visible("#nav a[data-page=nodes]")
    finally:
        page.set_viewport_size({"width": 1280, "height": 800})


@pytest.mark.browser
def test_tokens_are_made_and_revoked(page: Page, console_server: Server) -> None:
    page.goto("/console#/tokens")
    page.fill("#create-token input[name=name]", "viewer")
    for scope in ("exec", "files"):
        page.uncheck(f"#create-token input[value={scope}]")
    page.click("#create-token button[type=submit]")
    secret = page.wait_for_selector("#token-secret code").inner_text()
    row = page.locator("#token-list tr", has_text="viewer")
    row.wait_for()
    assert row.locator("td[data-label=Scopes]").inner_text() == "read"
    with httpx.Client(base_url=console_server.url) as http:
        assert http.get("/v1/sandboxes", headers={"X-API-Key": secret}).status_code == 200
        page.on("dialog", lambda dialog: dialog.accept())
        row.locator("button", has_text="revoke").click()
        row.wait_for(state="detached")
        assert http.get("/v1/sandboxes", headers={"X-API-Key": secret}).status_code == 401


@pytest.mark.browser
def test_lifecycle_actions_then_delete(
    page: Page, sandbox: dict[str, str], console_server: Server
) -> None:
    page.goto(f"/console#/sandboxes/{sandbox['id']}/commands")
    state = page.locator(".page-head h1 .badge")
    for action, after in (("pause", "paused"), ("resume", "running"), ("stop", "stopped"),
                          ("start", "running")):  # fmt: skip
        page.click(f".page-head button[data-action={action}]")
        page.wait_for_selector(f".page-head h1 .badge:text-is('{after}')")
    assert state.inner_text() == "running"
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(".page-head button[data-action=delete]")
    page.wait_for_url(re.compile(r"#/sandboxes$"))
    page.wait_for_selector("#sandbox-list :is(table, p.empty)")
    assert "console-box" not in page.inner_text("#sandbox-list")
    with console_server.client() as api:
        assert api.get(f"/v1/sandboxes/{sandbox['id']}").json()["state"] == "deleted"


@pytest.mark.browser
def test_sign_out(page: Page, console_server: Server) -> None:
    signed_in(page, console_server)
    page.goto("/console#/sandboxes")
    page.click("#sign-out")
    page.wait_for_selector("#signin")
    assert not [c for c in page.context.cookies() if c["name"] == "corral_console"]
    SIGNED_IN.clear()
    # The pages need a session again; signing in goes on to the page that was asked for.
    page.goto("/console#/nodes")
    page.fill("#token", console_server.admin_key)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#node-list td:has-text('local')")
    SIGNED_IN["yes"] = True


# --- over plain HTTP ---------------------------------------------------------------------------


def test_pages_and_assets_carry_a_strict_content_security_policy(console_server: Server) -> None:
    with httpx.Client(base_url=console_server.url) as http:
        page = http.get("/console")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-cache"
        # No inline script anywhere in the page: every <script> has a src.
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page.text) == []
        for path, media in (
            ("/console", "text/html"),
            ("/console/static/js/app.js", "text/javascript"),
            ("/console/static/js/pages/terminal.js", "text/javascript"),
            ("/console/static/vendor/xterm/xterm.js", "text/javascript"),
            ("/console/static/vendor/addon-fit/addon-fit.js", "text/javascript"),
            ("/console/static/console.css", "text/css"),
        ):
            resp = http.get(path)
            assert resp.status_code == 200, path
            assert resp.headers["content-type"].startswith(media), (path, resp.headers)
            policy = dict(
                part.strip().split(" ", 1)
                for part in resp.headers["content-security-policy"].split(";")
            )
            assert policy["script-src"] == "'self'", policy
            assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
            assert policy["frame-ancestors"] == "'none'"
            assert resp.headers["x-content-type-options"] == "nosniff"
            if path != "/console":
                assert resp.headers["cache-control"] == "public, max-age=3600"
                again = http.get(path, headers={"If-None-Match": resp.headers["etag"]})
                assert again.status_code == 304
        assert http.get("/console/static/nothing.js").status_code == 404
        # The vendored libraries ship with their licences.
        licence = http.get("/console/static/vendor/xterm/LICENSE").text
        assert "Permission is hereby granted, free of charge" in licence


def test_sign_in_with_a_bad_token_is_refused(console_server: Server) -> None:
    with httpx.Client(base_url=console_server.url) as http:
        for token in ("crl_not_a_token", "x"):
            resp = http.post("/console/api/session", json={"token": token})
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"]["code"] == "unauthenticated"
            assert "set-cookie" not in resp.headers
        assert http.post("/console/api/session", json={}).status_code == 422
        assert http.get("/console/api/session").status_code == 401
        # No other site may sign a browser in (with a token of its own choosing).
        forged = http.post(
            "/console/api/session",
            json={"token": console_server.admin_key},
            headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        )
        assert forged.status_code == 403 and "set-cookie" not in forged.headers


def sign_in(http: httpx.Client, server: Server, token: str | None = None) -> dict[str, Any]:
    resp = http.post("/console/api/session", json={"token": token or server.admin_key})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_the_session_cookie_is_httponly_and_strict(console_server: Server) -> None:
    with httpx.Client(base_url=console_server.url) as http:
        resp = http.post("/console/api/session", json={"token": console_server.admin_key})
        assert resp.status_code == 200, resp.text
        cookie = resp.headers["set-cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert cookie.startswith("corral_console=" + console_server.admin_key + ";")
        assert {"httponly", "samesite", "path", "max-age"} <= attributes, cookie
        assert "samesite=strict" in cookie.lower() and "path=/" in cookie.lower()
        assert "secure" not in attributes  # plain HTTP here; Secure when served over TLS
        assert resp.json()["admin"] is True and resp.json()["token_id"] == "admin"
        me = http.get("/console/api/session").json()
        assert me["csrf"] == resp.json()["csrf"] and console_server.admin_key not in me["csrf"]
        out = http.delete("/console/api/session", headers={"X-Corral-CSRF": me["csrf"]})
        assert out.status_code == 204 and 'corral_console=""' in out.headers["set-cookie"]
        assert http.get("/v1/sandboxes").status_code == 401
    # The cookie is the token: revoking the token ends the session.
    with httpx.Client(base_url=console_server.url) as http, console_server.client() as api:
        made = api.post("/v1/tokens", json={"name": "console-session", "scopes": ["read"]}).json()
        session = sign_in(http, console_server, made["secret"])
        assert session["admin"] is False and session["scopes"] == ["read"]
        assert http.get("/v1/sandboxes").status_code == 200
        # Its scopes hold: a read token may not create, CSRF token or not.
        refused = http.post("/v1/sandboxes", json={}, headers={"X-Corral-CSRF": session["csrf"]})
        assert refused.status_code == 403 and refused.json()["error"]["code"] != "csrf_refused"
        assert api.delete(f"/v1/tokens/{made['id']}").status_code == 204
        assert http.get("/v1/sandboxes").status_code == 401
        assert http.get("/console/api/session").status_code == 401


def test_a_cookie_request_without_the_csrf_token_is_refused(console_server: Server) -> None:
    with (
        httpx.Client(base_url=console_server.url, timeout=60) as http,
        console_server.client() as api,
    ):
        csrf = sign_in(http, console_server)["csrf"]
        before = len(api.get("/v1/sandboxes").json()["items"])
        # Reads need no token: no other origin can read the answers.
        assert http.get("/v1/sandboxes").status_code == 200
        for headers in (
            {},
            {"X-Corral-CSRF": "0" * 64},
            {"X-Corral-CSRF": csrf, "Origin": "http://evil.example"},
            {"X-Corral-CSRF": csrf, "Sec-Fetch-Site": "same-site"},
        ):
            resp = http.post("/v1/sandboxes", json={}, headers=headers)
            assert resp.status_code == 403, (headers, resp.text)
            assert resp.json()["error"]["code"] in ("csrf_refused", "cross_origin")
        assert len(api.get("/v1/sandboxes").json()["items"]) == before  # nothing was made
        made = http.post(
            "/v1/sandboxes",
            json={},
            headers={"X-Corral-CSRF": csrf, "Origin": console_server.url,
                     "Sec-Fetch-Site": "same-origin"},
        )  # fmt: skip
        assert made.status_code == 201, made.text
        box = made.json()["id"]
        try:
            refused = http.delete(f"/v1/sandboxes/{box}")
            assert refused.status_code == 403
            # A WebSocket handshake is checked too: it starts commands.
            ws_url = console_server.url.replace("http", "ws") + f"/v1/sandboxes/{box}/exec/stream"
            cookie = {"Cookie": f"corral_console={console_server.admin_key}"}
            assert ws_status(ws_url, {**cookie, "Origin": console_server.url}) == 403
            assert (
                ws_status(ws_url + "?csrf=" + csrf, {**cookie, "Origin": "http://evil.example"})
                == 403
            )
            assert (
                ws_status(ws_url + "?csrf=" + csrf, {**cookie, "Origin": console_server.url}) == 101
            )
            # A token of its own is judged alone: the cookie is ignored.
            keyed = http.post(
                f"/v1/sandboxes/{box}/exec",
                json={"command": "echo keyed"},
                headers={"Authorization": f"Bearer {console_server.admin_key}"},
            )
            assert keyed.status_code == 200 and keyed.json()["stdout"] == "keyed\n"
        finally:
            api.delete(f"/v1/sandboxes/{box}")


def ws_status(url: str, headers: dict[str, str]) -> int:
    """The HTTP status the server answers a WebSocket handshake with."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, additional_headers=headers, open_timeout=10) as socket:
            socket.send('{"type": "start", "command": "true"}')
            return 101
    except InvalidStatus as exc:
        return int(exc.response.status_code)
