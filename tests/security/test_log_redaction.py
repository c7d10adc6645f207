"""Nothing the server writes carries a secret: a real server at info level is sent tokens,
passwords, cookies and Basic-Auth credentials in every style a face accepts, and its whole log
output (request lines included) and every answer are searched for them."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
from collections.abc import Iterator

import asyncssh
import httpx
import pytest
import websockets

from corral.redaction import MASK, RedactingFilter, Redactor
from tests.conftest import Server, free_port
from tests.security.helpers import dedicated_server

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "pw-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    env = {
        "CORRAL_LOG_LEVEL": "info",
        "CORRAL_ADMIN_EMAIL": ADMIN_EMAIL,
        "CORRAL_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "CORRAL_SSH_PORT": str(free_port()),
        "CORRAL_RUNTIME": "fake",  # what is logged, not what runs, is under test
    }
    with dedicated_server("corral-redact-", env=env) as server:
        yield server


def new_token(api: httpx.Client) -> str:
    resp = api.post("/v1/tokens", json={"scopes": ["read", "exec"]})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["secret"])


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def raw(srv: Server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return data


def test_no_secret_reaches_the_log_or_an_answer(srv: Server) -> None:
    with srv.client() as api:
        tokens = [new_token(api) for _ in range(8)]
    wrong = {
        "not-a-token-" + os.urandom(8).hex(),
        "crl_" + os.urandom(16).hex(),
        "wrong-password-" + os.urandom(6).hex(),
        "basic-password-" + os.urandom(6).hex(),
        "cookie-secret-" + os.urandom(6).hex(),
    }
    bad_token, fake_crl, wrong_password, basic_password, cookie_secret = sorted(wrong)
    secrets = {srv.admin_key, ADMIN_PASSWORD, *tokens, *wrong}
    answers: list[bytes] = []
    with httpx.Client(base_url=srv.url, timeout=30) as http:

        def send(method: str, path: str, **kwargs: object) -> None:
            resp = http.request(method, path, **kwargs)  # type: ignore[arg-type]
            answers.append(resp.content + str(resp.headers).encode())

        send("GET", "/v1/sandboxes", headers={"Authorization": f"Bearer {srv.admin_key}"})
        send("GET", "/v1/sandboxes", headers={"Authorization": f"bearer {tokens[0]}"})
        send("GET", "/v1/sandboxes", headers={"X-API-Key": tokens[1]})
        send("GET", "/v1/sandboxes", headers={"Authorization": basic(tokens[2], basic_password)})
        send("GET", f"/v1/sandboxes?access_token={tokens[3]}")
        send("GET", f"/v1/sandboxes?limit=5&access_token={tokens[4]}&x=1")
        send("GET", f"/run/nobody/nothing?access_token={tokens[5]}&args=a")
        send("GET", f"/v1/sandboxes?token={bad_token}&api_key={fake_crl}")
        send("GET", "/v1/sandboxes", headers={"Authorization": f"Bearer {bad_token}"})
        send("GET", "/v1/sandboxes", headers={"X-API-Key": fake_crl})
        send("GET", f"/v1/nonexistent?access_token={bad_token}")
        cookie = f"rds_session={tokens[6]}; other={cookie_secret}"
        send("GET", "/v1/vms", headers={"Cookie": cookie})
        send("POST", "/auth/login", json={"email": ADMIN_EMAIL, "password": wrong_password})
        send("POST", "/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        send("POST", "/auth/login", json={"email": ADMIN_EMAIL, "password": 12})
        send("POST", "/auth/login", content=f'{{"password": "{wrong_password}"', headers={
            "content-type": "application/json"})  # fmt: skip
        send(
            "POST",
            f"/v1/sandboxes?access_token={tokens[7]}",
            json={"name": bad_token, "env": {"SECRET": cookie_secret}, "ttl_seconds": "x"},
        )
    # Below the application: a head over the cap, and a request the parser refuses.
    auth = f"Authorization: Bearer {tokens[0]}\r\n".encode()
    answers.append(raw(srv, b"GET /?access_token=" + tokens[1].encode() + b" HTTP/1.1\r\n" + auth
                        + b"X-Big: " + b"b" * 70_000 + b"\r\n\r\n"))  # fmt: skip
    answers.append(raw(srv, b"GET /\x00" + tokens[2].encode() + b" HTTP/1.1\r\n" + auth + b"\r\n"))
    # WebSockets (their handshakes are logged too) and the SSH front, token as user name.
    asyncio.run(_websockets_and_ssh(srv, tokens, bad_token))

    for answer in answers:
        for secret in secrets:
            assert secret.encode() not in answer, (secret, answer[:500])
    log = srv.log_path.read_text(errors="replace")
    assert f"access_token={MASK}" in log, log[-3000:]  # the request log is on, and redacted
    assert (
        '"method": "GET", "route": "/v1/sandboxes", "path": "/v1/sandboxes", "status": 200' in log
    )
    leaked = sorted(s for s in secrets if s in log)
    assert leaked == [], [line for line in log.splitlines() if any(s in line for s in leaked)]


async def _websockets_and_ssh(srv: Server, tokens: list[str], bad_token: str) -> None:
    base = f"ws://127.0.0.1:{srv.port}"
    for path in (
        f"/v1/sandboxes/nope/exec/stream?access_token={tokens[3]}",
        f"/run/nobody/nothing?access_token={bad_token}",
        f"/v2/runtimes/nope/exec/stream?access_token={tokens[4]}",
    ):
        try:
            async with websockets.connect(base + path, open_timeout=10) as ws:
                await asyncio.wait_for(ws.recv(), 5)
        except (websockets.WebSocketException, OSError, TimeoutError):
            pass
    ssh_port = int(_env(srv, "CORRAL_SSH_PORT"))
    for user in (tokens[5], bad_token):
        try:
            async with asyncssh.connect(
                "127.0.0.1", ssh_port, username=user, known_hosts=None, client_keys=None,
                password=bad_token, connect_timeout=10,
            ) as conn:  # fmt: skip
                await asyncio.wait_for(conn.run("whoami"), 10)
        except (asyncssh.Error, OSError, TimeoutError):
            pass


def _env(srv: Server, name: str) -> str:
    return srv.extra_env[name]


# --- the filter itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("GET /run/u/c?access_token=s3cr3t-value&args=1", "s3cr3t-value"),
        ("GET /x?api_key=abc123def&token=zz9zz9", "abc123def"),
        ("GET /x?api_key=abc123def&token=zz9zz9", "zz9zz9"),
        ("headers: [(b'authorization', b'Bearer abc.def-123')]", "abc.def-123"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("x-api-key: k-1234567890", "k-1234567890"),
        ("Cookie: rds_session=crl_abcdefgh; theme=dark", "theme=dark"),
        ('{"email": "a@b.c", "password": "hunter2hunter2"}', "hunter2hunter2"),
        ("connecting to postgresql://corral:pgpass77@db/corral", "pgpass77"),
        ("token crl_Zm9vYmFyYmF6cXV4 was revoked", "crl_Zm9vYmFyYmF6cXV4"),
        ("the key is operator-chosen-key", "operator-chosen-key"),
    ],
)
def test_the_redactor_removes_secrets_in_every_form(text: str, secret: str) -> None:
    redact = Redactor(["operator-chosen-key"])
    assert secret not in redact(text)
    assert MASK in redact(text)


def test_the_redactor_leaves_ordinary_text_alone() -> None:
    redact = Redactor(["operator-chosen-key"])
    for text in (
        '127.0.0.1:5000 - "GET /v1/sandboxes?limit=5 HTTP/1.1" 200',
        "this token lacks the 'exec' scope",
        "basic checks passed for sandbox sbx_123",
    ):
        assert redact(text) == text


def test_the_filter_keeps_the_access_log_arguments_in_place() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:1", "GET", "/v1/x?access_token=crl_secretsecret", "1.1", 200), None,
    )  # fmt: skip
    assert RedactingFilter(Redactor()).filter(record)
    assert record.args == ("127.0.0.1:1", "GET", f"/v1/x?access_token={MASK}", "1.1", 200)
