"""Schemathesis over the whole OpenAPI document, every operation of every face, against a real
server with real sandboxes: no server error, no status the document does not list, no response
that does not match its schema, and each response's content type one the document gives.

Path parameters are steered to real things most of the time so that operations get past 404: a
running sandbox (`TARGET`), a finished command in it, a cmd.io user with a named command; file
paths (`path`, `dest`) to a file and a directory of TARGET, and CMDOP's `machine_id(s)` to
TARGET. What would harm the run itself is bounded:
- operations that stop, pause, restart or change the network of a sandbox act on a second
  sandbox of their own (`VICTIM`), never on `TARGET`;
- deletions (sandboxes, runtimes, VMs, tokens, cmd.io users, commands, access entries) only get
  generated ids, which name nothing: deleting the shared sandbox, the user or the admin's own
  session would turn every later case into a 404 or 401;
- `POST /auth/logout` and `POST /auth/login` are left out: they manage the cookie session, not
  anything a generated request can reach, and a login makes a token per call;
- commands are bounded by the server's settings: 3 s unless a case asks for more, at most 30 s
  (run-dat-sheesh's own default), so that no generated command (or `?wait=true` on one) makes
  the run wait long; a CPU share under 1 is raised to 1 (a sandbox of 0.01 CPU takes seconds to
  start);
- sandboxes created by a case are deleted right after it, and the create operations' boundary
  cases are the invalid ones only (each valid one would start a sandbox).
The number of examples per operation is bounded (`EXAMPLES`) so that the run fits the suite.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Server
from tests.security import conftest as security_conftest
from tests.security.helpers import dedicated_server

pytestmark = [pytest.mark.sandbox, pytest.mark.schemathesis]

EXAMPLES = int(os.environ.get("CORRAL_SCHEMATHESIS_EXAMPLES", "10"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SETTINGS = {
    "CORRAL_MAX_TIMEOUT_MS": "30000",  # run-dat-sheesh's default timeout
    "CORRAL_DEFAULT_TIMEOUT_MS": "3000",
    "CORRAL_DEFAULT_DISK_MB": "0",
}
CREATES = (
    "/v1/sandboxes",
    "/v1/runtimes",
    "/v2/sandboxes",
    "/v3/sandboxes",
    "/v2/sandboxes/{name}/fork",
    "/v1/vms",
    "/v1/volumes",
    "/v1/images",
    "/v1/sandboxes/{sandbox}/snapshots",
    "/v1/sandboxes/{sandbox}/fork",
    "/e2b/sandboxes",
    "/e2b/v2/sandboxes",
)
SNAPSHOT_CREATES = ("/v1/sandboxes/{sandbox}/snapshots", "/v1/sandboxes/{sandbox}/fork")
FILE = "/workspace/fuzz.txt"
SANDBOX_PARAMS = ("sandbox", "runtime", "vm_id", "machine_id", "sandbox_id", "session_id")
LEFT_OUT = ("/auth/login", "/auth/logout")
ONLY = os.environ.get("CORRAL_SCHEMATHESIS_PATHS")  # a regex, to run some operations only
# Seconds of each call per operation, and the slowest calls, for the summary.
CALLS: dict[str, list[float]] = defaultdict(list)
SUCCEEDED: dict[str, int] = defaultdict(int)
SLOWEST: list[tuple[float, str]] = []

# Archives are bytes like any other (what they hold is up to the generated case).
schemathesis.serializer.alias("application/gzip", "application/octet-stream")
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")


@dataclass
class Targets:
    sandbox: str  # TARGET: running, shared by every case
    victim: str  # VICTIM: stopped, started, paused and re-networked at will
    command: str  # a finished command of TARGET
    user: str  # a cmd.io user with the named command `command_name`
    command_name: str


def destructive(method: str, path: str) -> bool:
    return method == "DELETE" and not path.endswith(("/files", "/commands/{command_id}"))


def lifecycle(method: str, path: str) -> bool:
    return method in ("POST", "PATCH") and (
        path.endswith(("/stop", "/start", "/pause", "/resume", "/snapshot", "/network-policy"))
        or (method == "PATCH" and path == "/v1/sandboxes/{sandbox}")
    )


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with dedicated_server("corral-test-fuzz-", SETTINGS) as server:
        yield server


@pytest.fixture(scope="module")
def targets(srv: Server) -> Targets:
    with srv.client() as api:
        sandbox = api.post("/v1/sandboxes", json={"name": "fuzz-target"}).json()["id"]
        victim = api.post("/v1/sandboxes", json={"name": "fuzz-victim"}).json()["id"]
        done = api.post(
            f"/v1/sandboxes/{sandbox}/exec", json={"command": f"echo hi | tee {FILE}"}
        ).json()
        assert done["status"] == "completed", done
        user = api.post("/v1/users", json={"name": "fuzzer"})
        assert user.status_code == 201, user.text
        named = api.post("/v1/users/fuzzer/commands", json={"name": "hello", "command": "echo"})
        assert named.status_code == 201, named.text
    return Targets(sandbox, victim, done["id"], "fuzzer", "hello")


@pytest.fixture(scope="module")
def api_schema(srv: Server, targets: Targets) -> Any:
    config = SchemathesisConfig.from_dict(
        {
            "base-url": srv.url,
            "headers": {"Authorization": f"Bearer {srv.admin_key}"},
            "request-timeout": 30,
            "generation": {"max-examples": EXAMPLES, "database": "none"},
            "suppress-health-check": ["all"],
            # Each sandbox a create makes costs a start: its boundary cases are the invalid
            # ones (quick 4xx), the valid ones come from a few generated examples.
            "operations": [
                {
                    # A pull's reference names a registry that does not answer here (no
                    # network): 502, as documented, is its answer.
                    "include-path": "/v1/images",
                    "include-method": "POST",
                    "phases": {"coverage": {"generation": {"mode": "negative"}}},
                    "generation": {"max-examples": max(2, EXAMPLES // 2)},
                    "checks": {
                        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "502"]}
                    },
                },
                {
                    "include-path": list(CREATES),
                    "include-method": "POST",
                    "phases": {"coverage": {"generation": {"mode": "negative"}}},
                    "generation": {"max-examples": max(2, EXAMPLES // 2)},
                },
            ],
        }
    )
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json", config=config)
    steer(schema, targets)
    return schema


def steer(schema: Any, targets: Targets) -> None:
    """A hook that points path parameters at real things, most of the time."""

    @schema.hook
    def flatmap_path_parameters(ctx: Any, params: dict[str, Any]) -> Any:
        operation = ctx.operation
        method, path = operation.method.upper(), operation.path
        if not params or destructive(method, path):
            return st.just(params)
        real = dict(params)
        for name in params:
            if name in SANDBOX_PARAMS:
                real[name] = targets.victim if lifecycle(method, path) else targets.sandbox
            elif name == "command_id":
                real[name] = targets.command
            elif name == "user":
                real[name] = targets.user
            elif name in ("command", "name") and "user" in params:
                real[name] = targets.command_name
        return st.sampled_from([real, real, real, params])

    @schema.hook
    def flatmap_query(ctx: Any, query: dict[str, Any] | None) -> Any:
        if not query or not any(k in query for k in ("path", "dest")):
            return st.just(query)
        real = {**query, **{k: FILE for k in ("path",) if k in query}}
        directory = {**query, **{k: "/workspace" for k in ("path", "dest") if k in query}}
        return st.sampled_from([real, directory, query])

    @schema.hook
    def flatmap_body(ctx: Any, body: Any) -> Any:
        if not isinstance(body, dict):
            return st.just(body)
        body = quick_to_start(body)
        real = dict(body)
        if "machine_id" in body:
            real["machine_id"] = targets.sandbox
        if "machine_ids" in body and isinstance(body["machine_ids"], list):
            real["machine_ids"] = [targets.sandbox, *body["machine_ids"][:1]]
        return st.sampled_from([real, real, body]) if real != body else st.just(body)


def quick_to_start(body: dict[str, Any]) -> dict[str, Any]:
    """The body with at least 1 CPU where it asks for a fraction: a sandbox of 0.01 CPU takes
    seconds to start, a long wait rather than a finding."""

    def raised(value: Any) -> Any:
        return 1.0 if isinstance(value, int | float) and value < 1 else value

    out = dict(body)
    for key in ("cpu", "vcpus"):
        if key in out:
            out[key] = raised(out[key])
    resources = out.get("resources")
    if isinstance(resources, dict):
        out["resources"] = quick_to_start(resources)
        requests = resources.get("requests")
        if isinstance(requests, dict):
            out["resources"]["requests"] = quick_to_start(requests)
    return out


schema = schemathesis.pytest.from_fixture("api_schema").exclude(path=list(LEFT_OUT))
if ONLY:
    schema = schema.include(path_regex=ONLY)


def created_sandbox(case: Any, response: Any) -> str | None:
    """The sandbox a create operation made, if it made one."""
    if case.method.upper() != "POST" or case.path not in CREATES:
        return None
    if case.path.endswith("/snapshots"):
        return None  # a snapshot: see created_snapshot
    if response.status_code not in (200, 201):
        return None
    body = response.json()
    found = body.get("id") or body.get("sandboxID") or (body.get("data") or {}).get("id")
    return found or (body.get("sandbox") or {}).get("id")


def created_snapshot(case: Any, response: Any) -> str | None:
    """The snapshot a snapshot or fork operation took, if it took one."""
    if case.method.upper() != "POST" or case.path not in SNAPSHOT_CREATES:
        return None
    if response.status_code != 201:
        return None
    body = response.json()
    return body.get("snapshot") if case.path.endswith("/fork") else body.get("id")


@pytest.mark.timeout(1200)
@schema.parametrize()
def test_every_operation_answers_as_documented(case: Any, srv: Server) -> None:
    if isinstance(case.body, dict):
        case.body = quick_to_start(case.body)  # whichever phase made it
    started = time.monotonic()
    response = case.call()
    took = time.monotonic() - started
    label = case.operation.label
    CALLS[label].append(took)
    SUCCEEDED[label] += response.status_code < 300
    SLOWEST.append((took, f"{label} {response.status_code} {str(case.body)[:300]}"))
    SLOWEST.sort(reverse=True)
    del SLOWEST[10:]
    try:
        case.validate_response(response, checks=CHECKS)
    finally:
        created = created_sandbox(case, response)
        if created is not None:
            with srv.client() as api:
                api.delete(f"/v1/sandboxes/{created}")
        snapshot = created_snapshot(case, response)
        if snapshot is not None:
            with srv.client() as api:
                api.delete(f"/v1/snapshots/{snapshot}")


def test_the_targets_survived(srv: Server, targets: Targets) -> None:
    """The run hit real things: the shared sandbox is still there and running."""
    with httpx.Client(
        base_url=srv.url, headers={"Authorization": f"Bearer {srv.admin_key}"}
    ) as api:
        assert api.get(f"/v1/sandboxes/{targets.sandbox}").json()["state"] == "running"
    calls = sum(len(c) for c in CALLS.values())
    slowest = sorted(CALLS.items(), key=lambda item: -sum(item[1]))[:8]
    security_conftest.SUMMARY["schemathesis"] = [
        f"{len(CALLS)} operations, {calls} calls, {sum(map(sum, CALLS.values())):.0f} s in calls",
        *(f"  {label}: {len(c)} calls, {sum(c):.1f} s" for label, c in slowest),
        "slowest calls:",
        *(f"  {took:.1f} s {what}" for took, what in SLOWEST),
        "operations that never succeeded: "
        + ", ".join(sorted(label for label in CALLS if not SUCCEEDED[label])),
    ]
    assert len(CALLS) > 80  # every operation was called
