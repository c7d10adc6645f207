"""`/v1/audit`: the audit log (admin, or a token with the `audit` scope)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query

from corral.api.auth import Caller, ServicesDep
from corral.core.errors import PermissionDenied, Unavailable
from corral.core.models import AuditEntry, Page, Scope, Timestamp

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=Page[AuditEntry])
async def list_audit(
    services: ServicesDep,
    caller: Caller,
    token: str | None = Query(None, max_length=64, description="A token id (`admin`: the key)"),
    action: str | None = Query(
        None, max_length=100, description="An action, or a prefix ending in `*` (`sandbox.*`)"
    ),
    target: str | None = Query(None, max_length=200, description="A sandbox, token ... id"),
    sandbox: str | None = Query(None, max_length=200, description="The same as target"),
    result: Literal["ok", "error"] | None = None,
    since: Timestamp | None = None,
    until: Timestamp | None = None,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = None,
) -> Page[AuditEntry]:
    """State-changing calls, newest first: who (token id and name), what (action, method,
    path with secrets masked), on what (target), with what result, when and from where."""
    if not caller.is_admin and Scope.audit not in caller.scopes:
        raise PermissionDenied("this token lacks the 'audit' scope")
    if services.audit is None:
        raise Unavailable("this server keeps no audit log")
    return await services.audit.list(
        token=token,
        action=action,
        target=target if target is not None else sandbox,
        result=result,
        since=since,
        until=until,
        limit=limit,
        cursor=cursor,
    )
