"""Cross-site request forgery: whether a browser sent a request from this server's own pages.

A request that a cookie authenticates, and that changes something, must pass `check_same_origin`.
The rule is the one of Go's `net/http.CrossOriginProtection`, which needs no token in the page:

1. `Sec-Fetch-Site`, which every current browser sends, must be `same-origin` or `none` (the
   user's own navigation: typed, bookmarked).
2. Without it, `Origin` (sent by browsers on every cross-origin POST) must name this server: its
   host and port equal the `Host` header. `Origin: null` (sandboxed frames, some redirects)
   fails.
3. A request with neither comes from no browser (curl, scripts) and passes: a page cannot make a
   browser leave both out.

The scheme of `Origin` is not compared, since behind a TLS proxy the server sees plain HTTP; a
page on the same host and port under the other scheme cannot exist.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from corral.core.errors import PermissionDenied

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class CrossOrigin(PermissionDenied):
    code = "cross_origin"


def same_origin(request: HTTPConnection) -> bool:
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "").strip().lower()
    try:
        parsed = urlsplit(origin.strip())
    except ValueError:
        return False
    return bool(host) and parsed.scheme in ("http", "https") and parsed.netloc.lower() == host


def check_same_origin(request: HTTPConnection) -> None:
    if not same_origin(request):
        raise CrossOrigin("a cross-origin request with the session cookie is refused")
