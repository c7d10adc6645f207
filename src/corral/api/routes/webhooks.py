"""`/v1/webhooks`: URLs that get signed events, and every delivery attempt to them."""

from __future__ import annotations

from fastapi import APIRouter, Query

from corral.api.auth import Caller, ServicesDep
from corral.core.models import Page
from corral.core.webhook_wire import Webhook, WebhookAttempt, WebhookCreate

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("", status_code=201, response_model=Webhook)
async def create_webhook(body: WebhookCreate, services: ServicesDep, caller: Caller) -> Webhook:
    """Deliver `events` (of `sandbox` only, if given) to `url`; the answer holds the signing
    `secret`, shown this once."""
    return await services.webhooks.create(caller, body)


@router.get("", response_model=list[Webhook])
async def list_webhooks(services: ServicesDep, caller: Caller) -> list[Webhook]:
    """The caller's webhooks (every one, for an admin token)."""
    return await services.webhooks.list(caller)


@router.get("/{webhook_id}", response_model=Webhook)
async def get_webhook(webhook_id: str, services: ServicesDep, caller: Caller) -> Webhook:
    return await services.webhooks.get(caller, webhook_id)


@router.delete("/{webhook_id}", response_model=Webhook)
async def delete_webhook(webhook_id: str, services: ServicesDep, caller: Caller) -> Webhook:
    """No more deliveries, pending ones included."""
    return await services.webhooks.delete(caller, webhook_id)


@router.get("/{webhook_id}/deliveries", response_model=Page[WebhookAttempt])
async def list_deliveries(
    webhook_id: str,
    services: ServicesDep,
    caller: Caller,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = None,
) -> Page[WebhookAttempt]:
    """Every delivery attempt, newest first: when, the answer's status or the error, how long
    it took, which attempt it was and when the next one is due."""
    return await services.webhooks.attempts(caller, webhook_id, limit=limit, cursor=cursor)
