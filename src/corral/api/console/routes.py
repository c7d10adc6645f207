"""The console's routes: its pages and assets under `/console`, and the sign-in under
`/console/api/session`.

Every asset is a file in `static/` (the console's own modules and style sheet, and the vendored
xterm.js: see scripts/vendor-console.sh). Each answer carries a Content-Security-Policy that
allows scripts from this origin only (no inline script, no eval) and connections to this origin
only (HTTP and WebSocket). Styles may be inline as well: the terminal's renderer writes its
measurements into a `<style>` element it creates.

The page itself (`/console`) is revalidated on every load (`no-cache` with an ETag); assets are
cached for an hour and revalidated after, so a new release is picked up within the hour without
file names that change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from corral.api.auth import get_services
from corral.api.console.session import COOKIE, cookie_secret, csrf_token, set_cookie
from corral.api.origin import check_same_origin
from corral.core.errors import Unauthenticated
from corral.core.tokens import Principal

STATIC_DIR = Path(__file__).parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self'; connect-src 'self'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
ASSET_CACHE = "public, max-age=3600"

router = APIRouter(include_in_schema=False)


class ConsoleAssets(StaticFiles):
    """The console's files, with its security and caching headers and fixed media types (module
    scripts are refused by browsers unless served as JavaScript, whatever the host's mime.types
    says)."""

    def file_response(
        self, full_path: Any, stat_result: Any, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        suffix = Path(str(full_path)).suffix
        if suffix in MEDIA_TYPES:
            response.headers["content-type"] = MEDIA_TYPES[suffix] + "; charset=utf-8"
        response.headers.update(SECURITY_HEADERS)
        response.headers["Cache-Control"] = ASSET_CACHE
        return response


def assets() -> ConsoleAssets:
    return ConsoleAssets(directory=str(STATIC_DIR))


@router.get("/console")
async def page(request: Request) -> Response:
    response = FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = "no-cache"
    return response


@router.get("/console/")
async def page_slash() -> Response:
    return RedirectResponse("/console", status_code=308)


class SignIn(BaseModel):
    token: str = Field(min_length=1, max_length=4096)


def session_json(principal: Principal, secret: str) -> dict[str, Any]:
    return {
        "token_id": principal.token_id,
        "admin": principal.is_admin,
        "scopes": sorted(scope.value for scope in principal.scopes),
        "sandbox_ids": sorted(principal.sandbox_ids) if principal.sandbox_ids is not None else None,
        "csrf": csrf_token(secret),
    }


@router.post("/console/api/session")
async def sign_in(body: SignIn, request: Request) -> Response:
    """Checks the token and keeps it in the session cookie. Same-origin only, so that no other
    site can sign a browser in with a token of its choosing."""
    check_same_origin(request)
    secret = body.token.strip()
    principal = await get_services(request).tokens.authenticate(secret)
    response = JSONResponse(session_json(principal, secret))
    set_cookie(request, response, secret)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/console/api/session")
async def who(request: Request) -> Response:
    """The signed-in session (401 if there is none, or its token was revoked or has expired)."""
    secret = request.cookies.get(COOKIE)
    if not secret:
        raise Unauthenticated("not signed in")
    principal = await get_services(request).tokens.authenticate(secret)
    response = JSONResponse(session_json(principal, secret))
    response.headers["Cache-Control"] = "no-store"
    return response


@router.delete("/console/api/session", status_code=204)
async def sign_out(request: Request) -> Response:
    """Forgets the cookie (the token itself stays valid: revoke it on the tokens page)."""
    cookie_secret(request)  # the same checks as any state-changing call with the cookie
    response = Response(status_code=204)
    set_cookie(request, response, None)
    return response
