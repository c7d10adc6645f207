"""run-dat-sheesh's admin session cookie: no cross-site request forgery, a throttled login, and
`/auth/me` telling the truth about the caller."""

from __future__ import annotations

import asyncio
import io
import math
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from tests.conftest import Server, make_data_dir

pytestmark = pytest.mark.sandbox

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "correct horse battery staple"
FREE_FAILURES = 5  # failed logins per address or account before any wait (corral.core.logins)
EVIL = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
_next_address = iter(range(2, 250))


@pytest.fixture(scope="module")
def rds() -> Iterator[Server]:
    data_dir = make_data_dir("corral-test-cookies-")
    srv = Server(
        data_dir,
        env={"CORRAL_ADMIN_EMAIL": ADMIN_EMAIL, "CORRAL_ADMIN_PASSWORD": ADMIN_PASSWORD},
    )
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


def address() -> str:
    """A loopback address of its own: the throttle counts per client address."""
    return f"127.0.0.{next(_next_address)}"


def browser(srv: Server, source: str | None = None) -> httpx.Client:
    """A client with a cookie jar and no token, from its own address."""
    transport = httpx.HTTPTransport(local_address=source or address())
    return httpx.Client(base_url=srv.url, transport=transport, timeout=30)


def login(
    client: httpx.Client, password: str = ADMIN_PASSWORD, email: str = ADMIN_EMAIL
) -> httpx.Response:
    return client.post("/auth/login", json={"email": email, "password": password})


def tar_gz(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def message_of(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"message"}, body
    return str(body["message"])


@pytest.fixture
def vm(rds: Server) -> Iterator[str]:
    with rds.client() as api:
        resp = api.post("/v1/vms", json={})
        assert resp.status_code == 201, resp.text
        vm_id = resp.json()["id"]
        yield vm_id
        api.delete(f"/v1/vms/{vm_id}")


# --- cross-site request forgery ----------------------------------------------------------------


def test_cross_origin_requests_with_the_cookie_are_refused(rds: Server, vm: str) -> None:
    with browser(rds) as page, rds.client() as api:
        assert login(page).status_code == 200
        cookie = page.cookies["rds_session"]
        upload = f"/v1/vms/{vm}/files/upload"
        archive = tar_gz("planted.txt", b"planted\n")
        # A cross-origin form post (text/plain) carrying the admin's cookie.
        forged = [
            EVIL,
            {"Origin": "http://evil.example"},  # a browser without Sec-Fetch-Site
            {"Origin": "null"},
            {"Sec-Fetch-Site": "same-site"},  # a sibling host is another origin
        ]
        for headers in forged:
            resp = page.post(
                upload,
                params={"dest": "/workspace"},
                content=archive,
                headers={**headers, "Content-Type": "text/plain"},
            )
            message_of(resp, 403)
        planted = api.get(f"/v1/sandboxes/{vm}/files", params={"path": "/workspace/planted.txt"})
        assert planted.status_code == 404, planted.text
        message_of(page.post(f"/v1/vms/{vm}/exec", json={"cmd": "true"}, headers=EVIL), 403)
        message_of(page.post(f"/v1/vms/{vm}/stop", headers=EVIL), 403)
        message_of(page.delete(f"/v1/vms/{vm}", headers=EVIL), 403)
        assert api.get(f"/v1/vms/{vm}").json()["state"] == "RUNNING"
        # A forged logout leaves the session alone; so does a forged login.
        message_of(page.post("/auth/logout", headers={**EVIL, "Content-Type": "text/plain"}), 403)
        message_of(
            page.post(
                "/auth/login",
                json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD},
                headers=EVIL,
            ),
            403,
        )
        assert page.cookies["rds_session"] == cookie
        assert page.get("/v1/vms").status_code == 200

        # The server's own pages, and clients that are no browser, pass.
        own = rds.url
        for headers in (
            {"Sec-Fetch-Site": "same-origin", "Origin": own},
            {"Origin": own},
            {"Sec-Fetch-Site": "none"},
            {},
        ):
            resp = page.post(f"/v1/vms/{vm}/exec", json={"cmd": "echo ok"}, headers=headers)
            assert resp.status_code == 200 and resp.json()["stdout"] == "ok\n", (headers, resp)
        done = page.post(
            upload,
            params={"dest": "/workspace"},
            content=archive,
            headers={"Origin": own, "Content-Type": "application/gzip"},
        )
        assert done.status_code == 204, done.text
        # Reads are no forgery; a key (which no page can add) needs no origin check.
        assert page.get("/v1/vms", headers=EVIL).status_code == 200
        keyed = httpx.post(
            f"{rds.url}/v1/vms/{vm}/exec",
            json={"cmd": "true"},
            headers={**EVIL, "X-API-Key": rds.admin_key},
        )
        assert keyed.status_code == 200, keyed.text
        # A same-origin logout works and ends the session.
        assert page.post("/auth/logout", headers={"Origin": own}).status_code == 200
        gone = httpx.get(f"{rds.url}/v1/vms", cookies={"rds_session": cookie})
        message_of(gone, 401)


def test_cookie_attributes(rds: Server) -> None:
    with browser(rds) as page:
        made = login(page)
        assert made.status_code == 200
        cookie = made.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert "secure" not in cookie  # served over plain HTTP
        # A proxy's X-Forwarded-Proto is not trusted: still no Secure.
        forwarded = page.post(
            "/auth/login",
            json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD},
            headers={"X-Forwarded-Proto": "https"},
        )
        assert "secure" not in forwarded.headers["set-cookie"].lower()
        cleared = page.post("/auth/logout").headers["set-cookie"].lower()
        assert "samesite=strict" in cleared and "httponly" in cleared and "max-age=0" in cleared


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_cookie_is_secure_when_served_over_tls(scheme: str) -> None:
    from corral.api.faces.rundatsheesh import set_session_cookie

    request = Request(
        {
            "type": "http",
            "scheme": scheme,
            "server": ("corral.example", 443),
            "headers": [(b"host", b"corral.example")],
            "path": "/",
            "query_string": b"",
        }
    )
    for secret in ("crl_x", None):
        response = Response()
        set_session_cookie(request, response, secret)
        header = response.headers["set-cookie"].lower()
        assert ("; secure" in header) == (scheme == "https"), header
        assert "samesite=strict" in header and "httponly" in header


# --- the login throttle ------------------------------------------------------------------------


def test_login_failures_are_throttled_per_address(rds: Server) -> None:
    with browser(rds) as client:
        # Another account each time: only the address is common.
        for _ in range(FREE_FAILURES + 1):
            message_of(login(client, "wrong", f"{uuid.uuid4().hex}@example.com"), 401)
        refused = login(client, "wrong", f"{uuid.uuid4().hex}@example.com")
        assert "try again" in message_of(refused, 429)
        first_wait = int(refused.headers["retry-after"])
        assert first_wait >= 1
        # Refused before the password is checked: the right one fares no better.
        message_of(login(client), 429)
        # Another address is not held up.
        with browser(rds) as elsewhere:
            message_of(login(elsewhere, "wrong", f"{uuid.uuid4().hex}@example.com"), 401)
        # After the wait one more try, then a longer wait.
        time.sleep(first_wait + 0.2)
        message_of(login(client, "wrong", f"{uuid.uuid4().hex}@example.com"), 401)
        again = login(client, "wrong", f"{uuid.uuid4().hex}@example.com")
        message_of(again, 429)
        assert int(again.headers["retry-after"]) >= 2 * first_wait


def test_a_burst_of_parallel_attempts_is_throttled(rds: Server) -> None:
    async def burst() -> list[int]:
        transport = httpx.AsyncHTTPTransport(local_address=address())
        limits = httpx.Limits(max_connections=25)
        async with httpx.AsyncClient(
            base_url=rds.url, transport=transport, limits=limits, timeout=60
        ) as client:
            body = {"email": "burst@example.com", "password": "wrong"}
            answers = await asyncio.gather(
                *(client.post("/auth/login", json=body) for _ in range(100))
            )
        return [r.status_code for r in answers]

    started = time.monotonic()
    statuses = asyncio.run(burst())
    took = time.monotonic() - started
    assert set(statuses) == {401, 429}
    # The free failures and the one that closed the address: each checked password was
    # counted. One more each time the burst outlasted a wait (1 s, 2 s, 4 s, ...).
    reopened = math.floor(math.log2(took + 1))
    assert FREE_FAILURES + 1 <= statuses.count(401) <= FREE_FAILURES + 1 + reopened, (
        statuses.count(401),
        took,
    )


def test_login_failures_are_throttled_per_account(rds: Server) -> None:
    # The admin's account, from a new address each time. (It ends open again: the test's last
    # login succeeds.)
    for _ in range(FREE_FAILURES + 1):
        with browser(rds) as client:
            message_of(login(client, "wrong"), 401)
    with browser(rds) as client:
        refused = login(client)  # the right password, from a fresh address
        message_of(refused, 429)
        wait = int(refused.headers["retry-after"])
        # Other accounts are not held up.
        message_of(login(client, "wrong", "someone-else@example.com"), 401)
        time.sleep(wait + 0.2)
        made = login(client)
        assert made.status_code == 200, made.text
        # A success forgets the account's failures.
        message_of(login(client, "wrong"), 401)
        assert login(client).status_code == 200


# --- /auth/me ----------------------------------------------------------------------------------


def test_me_reports_the_callers_real_scopes(rds: Server) -> None:
    with rds.client() as api:
        made = api.post("/v1/tokens", json={"scopes": ["read"], "sandbox_ids": ["some-box"]})
        assert made.status_code == 201, made.text
        reader = made.json()["secret"]
    me = httpx.get(f"{rds.url}/auth/me", cookies={"rds_session": reader})
    assert me.status_code == 200, me.text
    assert me.json() == {
        "email": None,
        "role": "user",
        "scopes": ["read"],
        "sandboxIds": ["some-box"],
    }
    keyed = httpx.get(f"{rds.url}/auth/me", headers={"X-API-Key": reader})
    assert keyed.json() == me.json()
    with browser(rds) as page:
        assert login(page).status_code == 200
        admin = page.get("/auth/me").json()
        assert admin["role"] == "admin" and admin["email"] == ADMIN_EMAIL
        assert "admin" in admin["scopes"] and admin["sandboxIds"] is None
    message_of(httpx.get(f"{rds.url}/auth/me"), 401)
    message_of(httpx.get(f"{rds.url}/auth/me", cookies={"rds_session": "crl_nope"}), 401)
