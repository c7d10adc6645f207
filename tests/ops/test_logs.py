"""One structured line per request: its fields, the client's request id, and no secret."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import Server
from tests.integration.helpers import wait_for
from tests.ops.conftest import log_lines, new_token

pytestmark = pytest.mark.sandbox


def line_of(server: Server, request_id: str) -> dict[str, object] | None:
    for line in log_lines(server):
        if line.get("request_id") == request_id:
            return line
    return None


def test_a_request_logs_one_json_line_without_its_token(
    ops_server: Server, ops_api: httpx.Client
) -> None:
    token = new_token(ops_api, ["read"])
    request_id = "ops-" + os.urandom(6).hex()
    with httpx.Client(base_url=ops_server.url, timeout=30) as http:
        resp = http.get(
            "/v1/sandboxes",
            params={"limit": 5, "access_token": token["secret"]},
            headers={"X-Request-Id": request_id},
        )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == request_id  # the client's id, given back
    assert wait_for(lambda: line_of(ops_server, request_id) is not None)
    line = line_of(ops_server, request_id)
    assert line is not None
    assert line["method"] == "GET" and line["route"] == "/v1/sandboxes"
    assert line["status"] == 200 and line["client"] == "127.0.0.1"
    assert line["token_id"] == token["id"]
    assert isinstance(line["duration_ms"], float) and 0 < line["duration_ms"] < 30_000
    assert line["path"] == "/v1/sandboxes?limit=5&access_token=[redacted]"
    assert line["level"] == "info" and line["event"] == "request" and "timestamp" in line
    text = ops_server.log_path.read_text(errors="replace")
    assert token["secret"] not in text
    assert ops_server.admin_key not in text


def test_every_request_gets_an_id_and_a_line(ops_server: Server, ops_api: httpx.Client) -> None:
    # An id that is not a plain token is replaced; an error answer carries the same id.
    resp = ops_api.get(
        "/v1/sandboxes/sb_nosuchsandbox", headers={"X-Request-Id": "an id with spaces"}
    )
    assert resp.status_code == 404
    request_id = resp.headers["x-request-id"]
    assert request_id.startswith("req_") and resp.json()["request_id"] == request_id
    assert wait_for(lambda: line_of(ops_server, request_id) is not None)
    line = line_of(ops_server, request_id)
    assert line is not None
    assert line["route"] == "/v1/sandboxes/{sandbox}" and line["status"] == 404
    assert line["token_id"] == "admin"
    # Nothing else writes text lines: uvicorn's access log is replaced by these.
    assert '"GET /v1/sandboxes' not in ops_server.log_path.read_text(errors="replace")


def test_text_format_for_a_terminal(limited_server: Server) -> None:
    request_id = "text-" + os.urandom(6).hex()
    with httpx.Client(base_url=limited_server.url, timeout=30) as http:
        http.get("/healthz", headers={"X-Request-Id": request_id})

    def line() -> str | None:
        text = limited_server.log_path.read_text(errors="replace")
        return next((x for x in text.splitlines() if f"request_id={request_id}" in x), None)

    assert wait_for(lambda: line() is not None)
    found = line()
    assert found is not None and not found.lstrip().startswith("{")
    assert "route=/healthz" in found and "status=200" in found and "method=GET" in found
