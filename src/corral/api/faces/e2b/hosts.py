"""E2B's host names under the server's public domain (`CORRAL_PUBLIC_DOMAIN`), for an SDK given
only `E2B_DOMAIN` (no `E2B_API_URL` or `E2B_SANDBOX_URL`, which the SDK means to drop):

- `api.<domain>` is the control API: `/path` is served as `/e2b/path`;
- `49983-<sandbox id>.<domain>` is that sandbox's daemon: `/path` is served as `/e2b/envd/path`,
  for the sandbox the host names (its `E2b-Sandbox-Id` is set from it; the access token still
  decides).

Every other name, `<port>-<id>.<domain>` among them, goes on as it came (to the port proxy).
"""

from __future__ import annotations

from typing import Any

from corral.api.ports.proxy import Receive, Send, header

ENVD_PORT = "49983"
SANDBOX_HEADER = b"e2b-sandbox-id"


class E2bHosts:
    def __init__(self, app: Any, *, public_domain: str | None) -> None:
        self.app = app
        self.domain = public_domain.split(":", 1)[0].lower() if public_domain else None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if self.domain is not None and scope["type"] in ("http", "websocket"):
            scope = self.rewritten(scope)
        await self.app(scope, receive, send)

    def rewritten(self, scope: dict[str, Any]) -> dict[str, Any]:
        host = header(scope, b"host")
        if host is None:
            return scope
        name = host.decode("latin-1").rsplit(":", 1)[0].lower().rstrip(".")
        if not name.endswith("." + self.domain):
            return scope
        label = name[: -len(self.domain) - 1]
        if label == "api":
            return self._under(scope, "/e2b", None)
        port, dash, ref = label.partition("-")
        if port == ENVD_PORT and dash and ref and "." not in ref:
            # A host name's hyphen may stand for the id's underscore (sb-0123... for sb_0123...).
            sandbox_id = ref if "_" in ref else ref.replace("-", "_", 1)
            return self._under(scope, "/e2b/envd", sandbox_id)
        return scope

    def _under(self, scope: dict[str, Any], prefix: str, sandbox_id: str | None) -> dict[str, Any]:
        path = scope["path"]
        raw = scope.get("raw_path") or path.encode()
        # The bare domain as the host: the port proxy behind must not take 49983-<id> as a port.
        dropped = (b"host", SANDBOX_HEADER)
        headers = [(k, v) for k, v in scope.get("headers", ()) if k not in dropped]
        headers.append((b"host", self.domain.encode("latin-1")))
        if sandbox_id is not None:
            headers.append((SANDBOX_HEADER, sandbox_id.encode("latin-1")))
        return {**scope, "path": prefix + path, "raw_path": prefix.encode() + bytes(raw),
                "headers": headers}  # fmt: skip
