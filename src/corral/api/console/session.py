"""The web console's sign-in: a token kept in a cookie, and the checks that make the cookie safe
to accept on the native API.

`POST /console/api/session {"token"}` checks the token and sets it as the `corral_console`
cookie (HttpOnly, so no script can read it; SameSite=Strict, so no other site's request carries
it; Secure when the server is reached over TLS; Path=/ so that `/v1` sees it). The cookie holds
the token itself, so revoking or expiring the token ends every console session made with it.

A request the cookie authenticates must, unless it only reads (GET, HEAD, OPTIONS):

1. come from this server's own pages (`corral.api.origin.check_same_origin`: `Sec-Fetch-Site`,
   else `Origin`), and
2. carry the session's CSRF token in `X-Corral-CSRF` (a WebSocket handshake, which cannot carry
   headers from a page, in `?csrf=`). The CSRF token is an HMAC of the cookie's secret, handed
   to the console's script by `GET /console/api/session`: a page of another origin can neither
   read it nor, since the header needs a CORS preflight that Corral never grants, send it.

A WebSocket handshake is a GET that starts commands and takes input, so it is checked as a
state-changing request. A request that carries a token of its own (any style) is judged by that
token alone; the cookie is then ignored.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from starlette.requests import HTTPConnection
from starlette.responses import Response

from corral.api.origin import SAFE_METHODS, check_same_origin
from corral.core.errors import PermissionDenied

COOKIE = "corral_console"
CSRF_HEADER = "x-corral-csrf"
CSRF_QUERY = "csrf"
SESSION_SECONDS = 12 * 3600  # the cookie's life; the token's own expiry still applies


class CsrfRefused(PermissionDenied):
    code = "csrf_refused"


def csrf_token(secret: str) -> str:
    """The session's CSRF token: bound to its secret, so nothing needs to be stored for it, and
    a cookie planted by a sibling host cannot come with a matching one."""
    return hmac.new(secret.encode(), b"corral-console-csrf", hashlib.sha256).hexdigest()


def cookie_secret(conn: HTTPConnection) -> str | None:
    """The console cookie's token, if the request carries one and may use it: for anything but
    a read, only from this server's pages and with the CSRF token (403 otherwise)."""
    secret = conn.cookies.get(COOKIE)
    if not secret:
        return None
    websocket = conn.scope["type"] == "websocket"
    if websocket or conn.scope.get("method") not in SAFE_METHODS:
        check_same_origin(conn)
        sent = conn.query_params.get(CSRF_QUERY) if websocket else conn.headers.get(CSRF_HEADER)
        if not sent or not hmac.compare_digest(sent.encode(), csrf_token(secret).encode()):
            raise CsrfRefused(
                "a request with the console cookie needs the session's CSRF token "
                f"(header {CSRF_HEADER.title()})"
            )
    return secret


def set_cookie(conn: HTTPConnection, response: Response, secret: str | None) -> None:
    """The session cookie, or its removal. Secure follows the scheme the server itself sees (a
    proxy's X-Forwarded-Proto is not trusted)."""
    attributes: dict[str, Any] = {
        "path": "/",
        "httponly": True,
        "samesite": "strict",
        "secure": conn.scope.get("scheme") in ("https", "wss"),
    }
    if secret is None:
        response.delete_cookie(COOKIE, **attributes)
    else:
        response.set_cookie(COOKIE, secret, max_age=SESSION_SECONDS, **attributes)
