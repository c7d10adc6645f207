"""`/v1/tokens`: scoped API tokens (admin only)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from corral.api.auth import Caller, ServicesDep
from corral.core.models import Page, Scope, Token, TokenCreate, TokenCreated

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", status_code=201, response_model=TokenCreated)
async def create_token(body: TokenCreate, services: ServicesDep, caller: Caller) -> TokenCreated:
    """The secret is in this answer only; the server keeps its hash."""
    caller.require(Scope.admin)
    return await services.tokens.create(body)


@router.get("", response_model=Page[Token])
async def list_tokens(services: ServicesDep, caller: Caller) -> Page[Token]:
    caller.require(Scope.admin)
    return Page[Token](items=await services.tokens.list())


@router.delete("/{token_id}", status_code=204)
async def delete_token(token_id: str, services: ServicesDep, caller: Caller) -> Response:
    caller.require(Scope.admin)
    await services.tokens.delete(token_id)
    return Response(status_code=204)
