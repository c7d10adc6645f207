"""The audit log's action names, derived from the app's own routes (api/observe.py): every
state-changing operation gets a `resource.verb` name, faces' prefixed with the face."""

from __future__ import annotations

import re

import pytest

from corral.api.app import create_app
from corral.api.observe import route_facts
from corral.settings import Settings


@pytest.fixture(scope="module")
def found(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    app = create_app(Settings(runtime="fake", data_dir=tmp_path_factory.mktemp("app")))
    found = {}
    for included in app.routes:
        for context in getattr(included, "effective_route_contexts", list)():
            route = context.original_route
            if "WebSocket" in type(route).__name__:
                facts = route_facts(route, "GET", True)
                found[("WS", facts.template)] = (facts.action, facts.target_param)
            for method in getattr(route, "methods", None) or ():
                facts = route_facts(route, method, False)
                found[(method, facts.template)] = (facts.action, facts.target_param)
    return found


Found = dict[tuple[str, str], tuple[str | None, str | None]]


def test_every_change_is_named_and_reads_are_not(found: Found) -> None:
    assert len(found) > 100
    for (method, template), (action, _) in found.items():
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            assert action is not None and re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)+", action), (
                method, template, action)  # fmt: skip
        elif method in ("GET", "HEAD"):
            assert action is None, (method, template)


def test_names_of_the_main_calls(found: Found) -> None:
    expected = {
        ("POST", "/v1/sandboxes"): ("sandbox.create", None),
        ("DELETE", "/v1/sandboxes/{sandbox}"): ("sandbox.delete", "sandbox"),
        ("POST", "/v1/sandboxes/{sandbox}/stop"): ("sandbox.stop", "sandbox"),
        ("POST", "/v1/sandboxes/{sandbox}/exec"): ("command.exec", "sandbox"),
        ("POST", "/v1/sandboxes/{sandbox}/commands"): ("command.start", "sandbox"),
        ("POST", "/v1/sandboxes/{sandbox}/commands/{command_id}/cancel"): (
            "command.cancel",
            "sandbox",
        ),
        ("WS", "/v1/sandboxes/{sandbox}/exec/stream"): ("command.start", "sandbox"),
        ("WS", "/v1/sandboxes/{sandbox}/commands/{command_id}/attach"): (None, "sandbox"),
        ("POST", "/v1/tokens"): ("token.create", None),
        ("DELETE", "/v1/tokens/{token_id}"): ("token.revoke", "token_id"),
        ("DELETE", "/v1/images/{image}"): ("image.delete", "image"),  # `{image:path}`
        ("POST", "/v1/images/import"): ("image.import", None),
        ("POST", "/v1/nodes/{node_id}/drain"): ("node.drain", "node_id"),
        ("POST", "/v2/sandboxes"): ("vercel.sandbox.create", None),
        ("POST", "/e2b/sandboxes"): ("e2b.sandbox.create", None),
        ("POST", "/v1/runtimes"): ("runta.runtime.create", None),
        ("POST", "/v1/vms"): ("rundatsheesh.vm.create", None),
        ("POST", "/console/api/session"): ("console.session.create", None),
    }
    assert {key: found.get(key) for key in expected} == expected
