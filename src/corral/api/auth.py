"""Who is calling: the token from any auth style a face uses, turned into a Principal."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import Depends, Request

from corral.api.console.session import cookie_secret
from corral.core.models import SandboxState
from corral.core.sandboxes import no_sandbox
from corral.core.tokens import Principal
from corral.services import Services
from corral.store.tables import SandboxRow


def token_from_request(request: Request) -> str | None:
    """Bearer, Basic-Auth username, X-API-Key, or ?access_token=, in that order."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return value.strip() or None
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            return decoded.partition(":")[0] or None
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    return request.query_params.get("access_token") or None


def get_services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def get_principal(request: Request) -> Principal:
    """The request's token, else the web console's session cookie (CSRF-checked)."""
    services = get_services(request)
    secret = token_from_request(request)
    if secret is None:
        secret = cookie_secret(request)
    return await services.tokens.authenticate(secret)


ServicesDep = Annotated[Services, Depends(get_services)]
Caller = Annotated[Principal, Depends(get_principal)]


def may_use(caller: Principal, row: SandboxRow) -> bool:
    live = row.state != SandboxState.deleted.value
    return caller.may_use(row.id, row.name, live=live)


async def usable_sandbox(services: Services, caller: Principal, ref: str) -> SandboxRow:
    """The sandbox `ref` names (an id, or the name of a live sandbox), if the caller's token may
    use it. One it may not use answers exactly as a missing one (404), so that a token limited
    to some sandboxes cannot probe for the others."""
    row = await services.sandboxes.row(ref)
    if not may_use(caller, row):
        raise no_sandbox(ref)
    return row


async def running_sandbox(services: Services, caller: Principal, ref: str) -> SandboxRow:
    """As usable_sandbox, and running (409 otherwise, 503 while it restarts)."""
    row = await usable_sandbox(services, caller, ref)
    return await services.sandboxes.check_running(row)
