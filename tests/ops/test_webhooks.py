"""Webhooks: a real receiver on loopback gets signed command.finished and sandbox.state events,
gets one again after answering 500 twice, sees every attempt listed; deliveries survive a killed
server; destinations that are not public are refused unless the operator allows them."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

import corral
from corral.core.webhooks import address_allowed
from tests.conftest import Server, make_data_dir
from tests.integration.helpers import wait_for

pytestmark = pytest.mark.sandbox

SECRET = "whsec_test_" + "s" * 24
WEBHOOK_ENV = {
    "CORRAL_WEBHOOK_ALLOW_PRIVATE": "1",  # the receiver is on loopback
    "CORRAL_WEBHOOK_RETRY_BASE_SECONDS": "0.3",  # retries within seconds
}


def verify_signature(secret: str, header: str, body: bytes, tolerance: int = 300) -> bool:
    """The check docs/webhooks.md documents, as a receiver writes it."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    timestamp = int(fields["t"])
    if abs(time.time() - timestamp) > tolerance:
        return False
    signed = f"{timestamp}.".encode() + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"])


class Receiver:
    """An HTTP server on loopback that records every POST and answers with the statuses it is
    given in turn (then 200)."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[int] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    receiver.received.append(
                        ({k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def events(self, predicate: Callable[[dict[str, Any]], bool] = lambda e: True) -> list[Any]:
        with self.lock:
            got = [(h, b, json.loads(b)) for h, b in self.received]
        return [item for item in got if predicate(item[2])]

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def hook_server() -> Iterator[Server]:
    data_dir = make_data_dir("corral-test-hooks-")
    srv = Server(data_dir, env=WEBHOOK_ENV)
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def api(hook_server: Server) -> Iterator[httpx.Client]:
    with hook_server.client() as client:
        yield client


def make_hook(api: httpx.Client, url: str, events: list[str], **extra: Any) -> dict[str, Any]:
    resp = api.post("/v1/webhooks", json={"url": url, "events": events, **extra})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_command_finished_signed_and_retried(api: httpx.Client, receiver: Receiver) -> None:
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    hook = make_hook(api, receiver.url, ["command.finished"], sandbox=sid, secret=SECRET)
    assert hook["secret"] == SECRET
    receiver.answers = [500, 500]
    ran = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "echo hi; exit 3"}).json()

    def mine(event: dict[str, Any]) -> bool:
        return event["data"]["command"]["id"] == ran["id"]

    assert wait_for(lambda: len(receiver.events(mine)) >= 3, 20), receiver.received
    time.sleep(1)  # nothing more comes after the 2xx
    got = receiver.events(mine)
    assert len(got) == 3
    headers, body, event = got[-1]
    assert event["type"] == "command.finished"
    assert event["data"]["command"]["exit_code"] == 3
    assert event["data"]["command"]["status"] == "completed"
    assert "stdout" not in event["data"]["command"]
    assert {h["corral-event-id"] for h, _, _ in got} == {event["id"]}
    assert [h["corral-delivery-attempt"] for h, _, _ in got] == ["1", "2", "3"]
    assert headers["content-type"] == "application/json"
    for h, b, _ in got:
        assert verify_signature(SECRET, h["corral-signature"], b)
    # A body changed on the way, or another secret, does not verify.
    tampered = body.replace(b'"exit_code":3', b'"exit_code":0')
    assert tampered != body
    assert not verify_signature(SECRET, headers["corral-signature"], tampered)
    assert not verify_signature("another-secret-of-16+", headers["corral-signature"], body)
    # Every attempt is listed, newest first.
    attempts = api.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"]
    assert [a["attempt"] for a in attempts] == [3, 2, 1]
    assert [a["status_code"] for a in attempts] == [200, 500, 500]
    assert attempts[0]["next_retry_at"] is None and attempts[0]["error"] is None
    assert all(a["next_retry_at"] is not None for a in attempts[1:])
    assert attempts[1]["error"] == "answered 500"
    assert {a["event_id"] for a in attempts} == {event["id"]}
    assert all(isinstance(a["duration_ms"], int) and a["at"] for a in attempts)
    api.delete(f"/v1/webhooks/{hook['id']}")
    api.delete(f"/v1/sandboxes/{sid}")


def test_sandbox_state_events(api: httpx.Client, receiver: Receiver) -> None:
    hook = make_hook(api, receiver.url, ["sandbox.state"])
    assert hook["secret"].startswith("whsec_")
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    assert api.post(f"/v1/sandboxes/{sid}/stop").status_code == 200
    api.delete(f"/v1/sandboxes/{sid}")

    def mine(event: dict[str, Any]) -> bool:
        return event["data"]["sandbox"]["id"] == sid

    def states() -> list[tuple[str | None, str]]:
        return [
            (e["data"]["previous_state"], e["data"]["sandbox"]["state"])
            for _, _, e in receiver.events(mine)
        ]

    expected = [(None, "creating"), ("creating", "running"), ("running", "stopped"),
                ("stopped", "deleted")]  # fmt: skip
    assert wait_for(lambda: sorted(states(), key=str) == sorted(expected, key=str), 20), states()
    for headers, body, _ in receiver.events(mine):
        assert verify_signature(hook["secret"], headers["corral-signature"], body)
        assert headers["corral-event-type"] == "sandbox.state"
    # No command events for a hook that did not ask for them.
    assert all(e["type"] == "sandbox.state" for _, _, e in receiver.events())
    api.delete(f"/v1/webhooks/{hook['id']}")


def test_webhooks_are_listed_without_secrets_and_per_token(
    api: httpx.Client, hook_server: Server, receiver: Receiver
) -> None:
    hook = make_hook(api, receiver.url, ["sandbox.state", "command.finished"])
    shown = api.get(f"/v1/webhooks/{hook['id']}").json()
    assert shown["secret"] is None
    assert shown["events"] == ["command.finished", "sandbox.state"]
    assert hook["id"] in [h["id"] for h in api.get("/v1/webhooks").json()]
    token = api.post("/v1/tokens", json={"name": "other", "scopes": ["sandboxes", "read"]})
    with hook_server.client(token.json()["secret"]) as other:
        assert other.get(f"/v1/webhooks/{hook['id']}").status_code == 404
        assert other.delete(f"/v1/webhooks/{hook['id']}").status_code == 404
        assert other.get(f"/v1/webhooks/{hook['id']}/deliveries").status_code == 404
        assert other.get("/v1/webhooks").json() == []
    assert api.delete(f"/v1/webhooks/{hook['id']}").status_code == 200
    assert api.get(f"/v1/webhooks/{hook['id']}").status_code == 404


def test_bad_webhooks_are_422(api: httpx.Client) -> None:
    for body in (
        {"url": "ftp://127.0.0.1/x", "events": ["sandbox.state"]},
        {"url": "http://user:pw@127.0.0.1/x", "events": ["sandbox.state"]},
        {"url": "http:///nohost", "events": ["sandbox.state"]},
        {"url": "http://" + "a" * 64 + ".example/x", "events": ["sandbox.state"]},
        {"url": "http://a..b/x", "events": ["sandbox.state"]},
        {"url": "http://127.0.0.1/x", "events": []},
        {"url": "http://127.0.0.1/x", "events": ["sandbox.created"]},
        {"url": "http://127.0.0.1/x", "events": ["sandbox.state"], "secret": "short"},
    ):
        resp = api.post("/v1/webhooks", json=body)
        assert resp.status_code == 422, (body, resp.text)
        assert resp.json()["error"]["code"] == "invalid_argument"


def test_deliveries_survive_a_killed_server(receiver: Receiver) -> None:
    """An event whose first attempt failed is delivered by the server started again after a
    SIGKILL: the delivery was stored, not held in memory."""
    data_dir = make_data_dir("corral-test-hooks-kill-")
    # A long first backoff: the retry is due only after the restart.
    srv = Server(data_dir, env={**WEBHOOK_ENV, "CORRAL_WEBHOOK_RETRY_BASE_SECONDS": "6"})
    try:
        srv.start()
        with srv.client() as api:
            sid = api.post("/v1/sandboxes", json={}).json()["id"]
            hook = make_hook(api, receiver.url, ["command.finished"], secret=SECRET)
            receiver.answers = [503]
            cid = api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "true"}).json()["id"]
            deliveries = f"/v1/webhooks/{hook['id']}/deliveries"
            assert wait_for(lambda: len(api.get(deliveries).json()["items"]) == 1, 10)
            # Running when the server dies: its result is unknown, and that is an event too.
            started = api.post(f"/v1/sandboxes/{sid}/commands", json={"command": "sleep 600"})
            running = started.json()["id"]
        srv.kill9()
        srv.start()

        def of(command_id: str) -> list[Any]:
            return receiver.events(lambda e: e["data"]["command"]["id"] == command_id)

        assert wait_for(lambda: len(of(cid)) == 2 and len(of(running)) == 1, 20), receiver.received
        with srv.client() as api:
            attempts = api.get(deliveries).json()["items"]
        tried = sorted((a["event_id"], a["attempt"], a["status_code"]) for a in attempts)
        first_event = of(cid)[0][2]["id"]
        assert [t for t in tried if t[0] == first_event] == [
            (first_event, 1, 503),
            (first_event, 2, 200),
        ]
        ((_, _, lost),) = of(running)
        assert lost["data"]["command"]["status"] == "lost"
        (_, b1, e1), (h2, b2, e2) = of(cid)
        assert e1["id"] == e2["id"] and e2["data"]["command"]["id"] == cid
        assert b1 == b2
        assert h2["corral-delivery-attempt"] == "2"
        assert verify_signature(SECRET, h2["corral-signature"], b2)
    finally:
        srv.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_private_destinations_refused_by_default(server: Server, receiver: Receiver) -> None:
    """The shared server runs with the default: no loopback, private or link-local URLs."""
    with server.client() as api:
        for url in (
            receiver.url,
            "http://localhost:9/x",
            "http://[::1]:9/x",
            "http://10.1.2.3/x",
            "http://192.168.0.1/x",
            "http://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://0.0.0.0/x",
        ):
            resp = api.post("/v1/webhooks", json={"url": url, "events": ["sandbox.state"]})
            assert resp.status_code == 422, (url, resp.text)
            assert "refused" in resp.json()["error"]["message"]
    assert receiver.events() == []


def test_address_allowed() -> None:
    assert address_allowed("93.184.216.34", False)
    assert address_allowed("2606:4700::1111", False)
    for private in ("127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                    "100.64.0.1", "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1"):  # fmt: skip
        assert not address_allowed(private, False), private
        assert address_allowed(private, True), private
    assert not address_allowed("0.0.0.0", True)
    assert not address_allowed("224.0.0.1", True)


def run_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_URL": server.url, "CORRAL_TOKEN": server.admin_key}
    return subprocess.run(
        [sys.executable, "-m", "corral.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_sdk_and_cli(hook_server: Server, receiver: Receiver) -> None:
    with corral.Client(hook_server.url, token=hook_server.admin_key) as client:
        sandbox = client.create_sandbox()
        hook = client.create_webhook(receiver.url, ["command.finished"], sandbox=sandbox)
        assert isinstance(hook, corral.Webhook) and hook.secret and hook.sandbox == sandbox.id
        assert hook.id in [h.id for h in client.list_webhooks()]
        assert client.get_webhook(hook).secret is None
        ran = client.exec(sandbox, "true")
        assert wait_for(lambda: len(client.list_webhook_deliveries(hook)) == 1, 20)
        (attempt,) = client.list_webhook_deliveries(hook)
        assert isinstance(attempt, corral.WebhookAttempt)
        assert attempt.status_code == 200 and attempt.attempt == 1
        headers, body, event = receiver.events()[-1]
        assert event["data"]["command"]["id"] == ran.id
        assert corral.verify_webhook(hook.secret, headers["corral-signature"], body)
        assert not corral.verify_webhook(hook.secret, headers["corral-signature"], body + b" ")
        # An old signature is refused by the tolerance.
        assert not corral.verify_webhook(
            hook.secret, headers["corral-signature"], body, now=time.time() + 3600
        )
        assert client.delete_webhook(hook).id == hook.id

        made = run_cli(hook_server, "webhooks", "create", receiver.url, "-e", "sandbox.state",
                       "--sandbox", sandbox.id, "--secret", SECRET)  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert made.stdout.strip() == SECRET
        hook_id = made.stderr.split()[2].rstrip(".")
        listed = run_cli(hook_server, "webhooks", "list", "--json")
        assert hook_id in [h["id"] for h in json.loads(listed.stdout)]
        client.stop_sandbox(sandbox)
        assert wait_for(lambda: len(client.list_webhook_deliveries(hook_id)) >= 1, 20)
        table = run_cli(hook_server, "webhooks", "deliveries", hook_id)
        assert table.returncode == 0 and "sandbox.state" in table.stdout and "200" in table.stdout
        gone = run_cli(hook_server, "webhooks", "delete", hook_id)
        assert gone.returncode == 0 and gone.stdout.strip() == hook_id
        missing = run_cli(hook_server, "webhooks", "deliveries", hook_id)
        assert missing.returncode != 0 and "not_found" in missing.stderr
        client.delete_sandbox(sandbox)
