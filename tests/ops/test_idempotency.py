"""Idempotency-Key on creates and command starts: one sandbox per key and token, the first answer
replayed, another body refused, a concurrent retry answered alike, and a crash between the
create and its answer survived by the retry (a real server SIGKILLed at that point)."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest

from corral import Client
from tests.conftest import Server, make_data_dir

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module")
def own_server() -> Iterator[Server]:
    """A server of this module's own: its sandbox list counts only what these tests make."""
    data_dir = make_data_dir("corral-test-idem-")
    srv = Server(data_dir)
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def api(own_server: Server) -> Iterator[httpx.Client]:
    with own_server.client() as client:
        yield client


def sandbox_ids(api: httpx.Client) -> set[str]:
    return {s["id"] for s in api.get("/v1/sandboxes", params={"limit": 1000}).json()["items"]}


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


def test_same_key_twice_creates_one_sandbox(api: httpx.Client) -> None:
    before = sandbox_ids(api)
    key = str(uuid.uuid4())
    first = api.post("/v1/sandboxes", json={"labels": {"k": "1"}}, headers=keyed(key))
    assert first.status_code == 201, first.text
    # The same JSON spelt otherwise is the same request.
    again = api.post("/v1/sandboxes", content=b'{ "labels" : {"k":"1"} }', headers=keyed(key))
    assert again.status_code == 201, again.text
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    assert sandbox_ids(api) - before == {first.json()["id"]}
    api.delete(f"/v1/sandboxes/{first.json()['id']}")


def test_same_key_other_body_is_422(api: httpx.Client) -> None:
    key = str(uuid.uuid4())
    first = api.post("/v1/sandboxes", json={}, headers=keyed(key))
    assert first.status_code == 201, first.text
    before = sandbox_ids(api)
    other = api.post("/v1/sandboxes", json={"labels": {"a": "b"}}, headers=keyed(key))
    assert other.status_code == 422, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert "request_id" in other.json()
    # Another path with the key is another request too.
    sid = first.json()["id"]
    elsewhere = api.post(f"/v1/sandboxes/{sid}/commands", json={}, headers=keyed(key))
    assert elsewhere.status_code == 422
    assert sandbox_ids(api) == before
    api.delete(f"/v1/sandboxes/{sid}")


def test_keys_are_per_token(api: httpx.Client, own_server: Server) -> None:
    made = api.post("/v1/tokens", json={"name": "idem", "scopes": ["sandboxes", "read"]})
    assert made.status_code == 201, made.text
    key = str(uuid.uuid4())
    mine = api.post("/v1/sandboxes", json={}, headers=keyed(key))
    with own_server.client(made.json()["secret"]) as other:
        theirs = other.post("/v1/sandboxes", json={}, headers=keyed(key))
    assert theirs.status_code == 201, theirs.text
    assert "idempotent-replayed" not in theirs.headers
    assert theirs.json()["id"] != mine.json()["id"]
    for sid in (mine.json()["id"], theirs.json()["id"]):
        api.delete(f"/v1/sandboxes/{sid}")


def test_bad_keys_are_400(api: httpx.Client) -> None:
    before = sandbox_ids(api)
    for bad in ("k" * 256, "tab\tinside"):
        resp = api.post("/v1/sandboxes", json={}, headers=keyed(bad))
        assert resp.status_code == 400, (bad, resp.text)
        assert resp.json()["error"]["code"] in ("invalid_idempotency_key", "bad_request")
    resp = api.post("/v1/sandboxes", json={}, headers=[("Idempotency-Key", b"caf\xe9")])
    assert resp.status_code == 400, resp.text
    longest = api.post("/v1/sandboxes", json={}, headers=keyed("k" * 255))
    assert longest.status_code == 201, longest.text
    assert sandbox_ids(api) - before == {longest.json()["id"]}
    api.delete(f"/v1/sandboxes/{longest.json()['id']}")


def test_refusals_free_the_key(api: httpx.Client) -> None:
    key = str(uuid.uuid4())
    refused = api.post("/v1/sandboxes", json={"template": "no-such"}, headers=keyed(key))
    assert refused.status_code == 409, refused.text
    # Nothing was made: the key is free for the same request to be tried again.
    again = api.post("/v1/sandboxes", json={"template": "no-such"}, headers=keyed(key))
    assert again.status_code == 409
    assert "idempotent-replayed" not in again.headers


def test_command_start_once_per_key(api: httpx.Client) -> None:
    sid = api.post("/v1/sandboxes", json={}).json()["id"]
    base = f"/v1/sandboxes/{sid}"
    key = str(uuid.uuid4())
    body = {"command": "echo once >> /workspace/runs"}
    first = api.post(f"{base}/commands", json=body, headers=keyed(key))
    assert first.status_code == 202, first.text
    again = api.post(f"{base}/commands", json=body, headers=keyed(key))
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    done = api.get(f"{base}/commands/{first.json()['id']}", params={"wait": "true"})
    assert done.json()["status"] == "completed"
    # A sync exec with a key: its result replayed, the command run once.
    ekey = str(uuid.uuid4())
    ran = api.post(f"{base}/exec", json={"command": "echo x >> runs; wc -l < runs"},
                   headers=keyed(ekey))  # fmt: skip
    rerun = api.post(f"{base}/exec", json={"command": "echo x >> runs; wc -l < runs"},
                     headers=keyed(ekey))  # fmt: skip
    assert ran.json()["stdout"] == rerun.json()["stdout"] == "2\n"
    count = api.post(f"{base}/exec", json={"command": "wc -l < runs"}).json()["stdout"]
    assert count == "2\n"
    commands = api.get(f"{base}/commands").json()["items"]
    assert len(commands) == 3
    api.delete(base)


def test_concurrent_retry_gets_the_same_sandbox(api: httpx.Client, own_server: Server) -> None:
    before = sandbox_ids(api)
    key = str(uuid.uuid4())
    answers: list[httpx.Response] = []

    def create() -> None:
        with own_server.client() as client:
            answers.append(client.post("/v1/sandboxes", json={}, headers=keyed(key)))

    threads = [threading.Thread(target=create) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [201, 201, 201], [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 2
    assert sandbox_ids(api) - before == {answers[0].json()["id"]}
    api.delete(f"/v1/sandboxes/{answers[0].json()['id']}")


class LoseFirstAnswer(httpx.BaseTransport):
    """Sends every request to the server for real, but breaks the exchange after the first
    one's answer came: as a network failure between server and client would."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        response = self.inner.handle_request(request)
        if len(self.sent) == 1:
            response.read()
            response.close()
            raise httpx.ReadError("connection reset", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def test_sdk_sends_a_key_and_reuses_it_on_its_retry(api: httpx.Client, own_server: Server) -> None:
    before = sandbox_ids(api)
    transport = LoseFirstAnswer()
    with Client(own_server.url, token=own_server.admin_key, transport=transport) as client:
        sandbox = client.create_sandbox(labels={"sdk": "retry"})
    assert len(transport.sent) == 2
    keys = {r.headers["idempotency-key"] for r in transport.sent}
    assert len(keys) == 1
    assert uuid.UUID(keys.pop()).version == 4
    assert sandbox_ids(api) - before == {sandbox.id}
    # Without retries, the broken exchange is the caller's error.
    with Client(own_server.url, token=own_server.admin_key, transport=LoseFirstAnswer(),
                retries=0) as client:  # fmt: skip
        with pytest.raises(ConnectionError):
            client.create_sandbox()
    api.delete(f"/v1/sandboxes/{sandbox.id}")


def test_sdk_takes_the_callers_key(api: httpx.Client, own_server: Server) -> None:
    key = "order-" + uuid.uuid4().hex
    with Client(own_server.url, token=own_server.admin_key) as client:
        one = client.create_sandbox(idempotency_key=key)
        two = client.create_sandbox(idempotency_key=key)
        assert one.id == two.id
        first = client.start_command(one, "true", idempotency_key=key + "-cmd")
        second = client.start_command(one, "true", idempotency_key=key + "-cmd")
        assert first.id == second.id
        client.delete_sandbox(one)


def test_a_crash_between_create_and_answer(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The server dies (SIGKILL, by its test hook) right after the sandbox's row is committed,
    before anything is answered; started again on the same data dir, it answers the retry with
    that same sandbox."""
    data_dir = make_data_dir("corral-test-idem-crash-")
    srv = Server(data_dir, env={"CORRAL_TEST_CRASH_AT": "sandbox-created"})
    try:
        srv.start()
        key = str(uuid.uuid4())
        with srv.client() as client:
            with pytest.raises(httpx.HTTPError):
                client.post("/v1/sandboxes", json={"name": "crashed"}, headers=keyed(key))
        assert srv.proc is not None
        assert srv.proc.wait(20) == -9  # killed itself at the hook
        srv.proc = None
        srv.extra_env = {}
        srv.start()
        with srv.client() as client:
            retry = client.post("/v1/sandboxes", json={"name": "crashed"}, headers=keyed(key))
            assert retry.status_code == 201, retry.text
            listed = client.get("/v1/sandboxes").json()["items"]
            assert [s["id"] for s in listed] == [retry.json()["id"]]
            assert retry.json()["name"] == "crashed"
            # And from then on, that answer is the key's.
            again = client.post("/v1/sandboxes", json={"name": "crashed"}, headers=keyed(key))
            assert again.json()["id"] == retry.json()["id"]
            ran = client.post(f"/v1/sandboxes/{retry.json()['id']}/exec", json={"command": "true"})
            assert ran.status_code == 200, ran.text
            client.delete(f"/v1/sandboxes/{retry.json()['id']}")
    finally:
        srv.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_replayed_token_keeps_its_secret_sealed(api: httpx.Client, own_server: Server) -> None:
    """A token create's answer holds the token's secret: the store keeps it sealed under a key
    only the caller's own secret gives, so the database never shows it."""
    key = str(uuid.uuid4())
    body = {"name": "sealed", "scopes": ["read"]}
    first = api.post("/v1/tokens", json=body, headers=keyed(key))
    assert first.status_code == 201, first.text
    again = api.post("/v1/tokens", json=body, headers=keyed(key))
    assert again.json() == first.json()
    secret = first.json()["secret"].encode()
    names = [t["name"] for t in api.get("/v1/tokens").json()["items"]]
    assert names.count("sealed") == 1
    with sqlite3.connect(own_server.data_dir / "corral.db") as db:
        stored = db.execute("SELECT body FROM idempotency_keys WHERE key = ?", (key,)).fetchone()
    assert stored is not None and stored[0]
    assert secret not in stored[0] and b"sealed" not in stored[0]
