"""Health and the API documentation, served from the package (no CDN)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from corral import __version__
from corral.api.auth import ServicesDep
from corral.core.models import Health

router = APIRouter(tags=["system"])
STATIC = "/docs/static"


@router.get("/healthz", response_model=Health)
async def healthz(services: ServicesDep) -> Health:
    return Health(
        version=__version__,
        # A replica of a fleet run without a node of its own has none to name.
        node=services.node.id if services.node is not None else "none",
        runtime=services.node.runtime_name if services.node is not None else "none",
        warm_sandboxes=services.sandboxes.warm_count,
    )


@router.get("/docs", include_in_schema=False)
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="Corral API",
        swagger_js_url=f"{STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{STATIC}/favicon-32x32.png",
    )
