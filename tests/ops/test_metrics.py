"""`GET /metrics`: parsed by the Prometheus client's own parser, its values move as the tests
act; who may read it."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import Server
from tests.integration.helpers import wait_for
from tests.ops.conftest import METRICS_SECRET, new_token, scrape, value

pytestmark = pytest.mark.sandbox


def test_series_move_with_creates_execs_and_streams(ops_api: httpx.Client) -> None:
    before = scrape(ops_api)
    resp = ops_api.post("/v1/sandboxes", json={})
    assert resp.status_code == 201, resp.text
    sid = resp.json()["id"]
    try:
        for _ in range(3):
            resp = ops_api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "true"})
            assert resp.status_code == 200 and resp.json()["exit_code"] == 0, resp.text
        resp = ops_api.post(f"/v1/sandboxes/{sid}/exec", json={"command": "exit 3"})
        assert resp.json()["exit_code"] == 3
        started = ops_api.post(f"/v1/sandboxes/{sid}/commands", json={"command": "printf 12345"})
        assert started.status_code == 202, started.text
        cid = started.json()["id"]
        logs = ops_api.get(f"/v1/sandboxes/{sid}/commands/{cid}/logs", params={"format": "raw"})
        assert logs.content == b"12345"
        during = scrape(ops_api)
    finally:
        assert ops_api.delete(f"/v1/sandboxes/{sid}").status_code == 200
    after = scrape(ops_api)

    def moved(name: str, samples: dict = during, **labels: str) -> float:  # type: ignore[type-arg]
        return value(samples, name, **labels) - value(before, name, **labels)

    exec_route = "/v1/sandboxes/{sandbox}/exec"
    assert moved("corral_http_requests_total", method="POST", route=exec_route, status="200") == 4
    assert moved("corral_http_requests_total", method="POST", route="/v1/sandboxes",
                 status="201") == 1  # fmt: skip
    assert moved("corral_http_request_duration_seconds_count", route=exec_route) == 4
    assert moved("corral_exec_duration_seconds_count", source="native") == 4
    assert moved("corral_exec_duration_seconds_bucket", source="native", le="+Inf") == 4
    # Completed counts the exit 3 too (it ran to its end); the started one as it ends.
    assert moved("corral_commands_finished_total", status="completed") in (4, 5)
    assert moved("corral_sandbox_create_duration_seconds_count", warm="false") == 1
    assert moved("corral_stream_bytes_sent_total", kind="raw") == 5
    assert moved("corral_sandboxes", state="running", node="local") == 1
    assert moved("corral_sandboxes", samples=after, state="running", node="local") == 0
    assert moved("corral_http_requests_total", samples=after, method="DELETE",
                 route="/v1/sandboxes/{sandbox}", status="200") == 1  # fmt: skip
    # Route templates, never raw paths: no series names a sandbox.
    assert not [key for key in after if any(sid in v for _, v in key[1])]
    assert value(after, "corral_warm_pool_sandboxes") == 0  # the test servers keep no pool


def test_node_heartbeats_are_counted(ops_api: httpx.Client) -> None:
    # The built-in node beats every CORRAL_NODE_LOST_AFTER_S / 3 (5 s by default).
    def beats() -> float:
        return value(scrape(ops_api), "corral_node_heartbeats_total", node="local", result="taken")

    first = beats()
    assert wait_for(lambda: beats() > first, 12)


def test_unmatched_paths_share_one_series(ops_api: httpx.Client) -> None:
    for n in range(3):
        assert ops_api.get(f"/no/such/path/{n}").status_code == 404
    samples = scrape(ops_api)
    assert value(samples, "corral_http_requests_total", route="(unrouted)", status="404") >= 3
    assert not [key for key in samples if any("/no/such" in v for _, v in key[1])]


def test_who_may_read_metrics(ops_server: Server, ops_api: httpx.Client) -> None:
    with httpx.Client(base_url=ops_server.url, timeout=30) as anonymous:
        resp = anonymous.get("/metrics")
        assert resp.status_code == 401
        body = resp.json()
        assert body["error"]["code"] == "unauthenticated" and body["request_id"].startswith("req_")
        reader = new_token(ops_api, ["read", "exec"])
        resp = anonymous.get("/metrics", headers={"Authorization": f"Bearer {reader['secret']}"})
        assert resp.status_code == 403
        assert resp.json()["error"]["code"] == "permission_denied"
        watcher = new_token(ops_api, ["metrics"])
        scrape(anonymous, headers={"Authorization": f"Bearer {watcher['secret']}"})
        # The metrics scope gives nothing else.
        resp = anonymous.get(
            "/v1/sandboxes", headers={"Authorization": f"Bearer {watcher['secret']}"}
        )
        assert resp.status_code == 403


def test_metrics_token_and_rate_limit_refusals(limited_server: Server) -> None:
    with httpx.Client(base_url=limited_server.url, timeout=30) as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        secret = {"Authorization": f"Bearer {METRICS_SECRET}"}
        before = value(scrape(http, headers=secret), "corral_rate_limited_total", kind="token")
        with limited_server.client() as api:
            token = new_token(api, ["read"])
        auth = {"Authorization": f"Bearer {token['secret']}"}
        statuses = [http.get("/v1/sandboxes", headers=auth).status_code for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and statuses[3:] == [429, 429], statuses
        after = scrape(http, headers=secret)
        assert value(after, "corral_rate_limited_total", kind="token") - before == 2
        assert value(after, "corral_http_requests_total", route="/v1/sandboxes",
                     status="429") >= 2  # fmt: skip


def test_a_scrape_counts_the_one_before_it(ops_api: httpx.Client) -> None:
    """The counters are this process's: they start at zero with the process and only grow."""
    first = scrape(ops_api)
    time.sleep(0.05)
    second = scrape(ops_api)
    name, route = "corral_http_requests_total", "/metrics"
    assert value(second, name, route=route) == value(first, name, route=route) + 1
