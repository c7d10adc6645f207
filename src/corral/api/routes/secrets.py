"""`/v1/secrets`: named values that sandboxes' injection rules add to their HTTPS requests on
the node. Values go in and never come out: listing shows names and times only."""

from __future__ import annotations

from fastapi import APIRouter, Response

from corral.api.auth import Caller, ServicesDep
from corral.core.errors import PermissionDenied
from corral.core.models import Page, Scope, Secret, SecretCreate
from corral.core.tokens import Principal

router = APIRouter(prefix="/v1/secrets", tags=["secrets"])


def _allowed(caller: Principal) -> None:
    caller.require(Scope.secrets)
    if caller.sandbox_ids is not None:
        raise PermissionDenied("a token limited to some sandboxes cannot use secrets")


@router.post("", response_model=Secret, status_code=201)
async def put_secret(
    body: SecretCreate, services: ServicesDep, caller: Caller, response: Response
) -> Secret:
    """Store a secret, or replace the value of one of that name (200); running sandboxes get
    a new value at their next start or network change."""
    _allowed(caller)
    secret, created = await services.secrets.put(body)
    if not created:
        response.status_code = 200
    return secret


@router.get("", response_model=Page[Secret])
async def list_secrets(services: ServicesDep, caller: Caller) -> Page[Secret]:
    _allowed(caller)
    return Page[Secret](items=await services.secrets.list())


@router.delete("/{name}", response_model=Secret)
async def delete_secret(name: str, services: ServicesDep, caller: Caller) -> Secret:
    """Rules that name it add no header from the sandbox's next start or network change."""
    _allowed(caller)
    return await services.secrets.delete(name)
