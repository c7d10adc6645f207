"""The ASGI application factory. Nothing is built at import time."""

from __future__ import annotations

import gc
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from corral import __version__
from corral.api import errors, observe
from corral.api.faces import cmdio, cmdop, e2b, rundatsheesh, runta, vercel
from corral.api.faces.e2b.hosts import E2bHosts
from corral.api.fast_exec import ExecFastPath
from corral.api.idempotency import Idempotency
from corral.api.middleware import RequestContext
from corral.api.observe import Observe
from corral.api.ports import PortProxy
from corral.api.ports import router as ports_router
from corral.api.routes import (
    audit,
    commands,
    files,
    images,
    nodes,
    run,
    sandboxes,
    secrets,
    snapshots,
    streams,
    system,
    tokens,
    volumes,
    webhooks,
)
from corral.core.models import ErrorResponse
from corral.redaction import Redactor
from corral.services import Services
from corral.settings import Settings

FASTAPI_422 = "#/components/schemas/HTTPValidationError"
# What api/http_protocol.py answers for any path, before a route (and so a face) is known.
PROTOCOL_REFUSALS = {
    414: "The request target exceeds 16 KiB",
    431: "The request head exceeds 64 KiB, or a header line 16 KiB",
}
DESCRIPTION = (
    "Corral creates isolated sandboxes and runs commands and code in them. "
    "Authenticate with `Authorization: Bearer <token>` (or `X-API-Key`)."
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await Services.start(settings)
        app.state.services = services
        ssh = None
        if settings.ssh_port:  # the cmd.io face's SSH front
            from corral.ssh import start_ssh_server

            ssh = await start_ssh_server(services)
        # What start-up made lives as long as the server: out of the collector's sight, a
        # full collection walks only what requests leave behind (it walked ~220,000 objects,
        # a 100 ms pause in the middle of some request, every few thousand execs).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if ssh is not None:
                ssh.close()
                await ssh.wait_closed()
            await services.close()

    app = FastAPI(
        title="Corral",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    errors.install(app)
    # Innermost of the middleware (added first): behind the request id, the body limit,
    # idempotency keys and the rest, in front of the router.
    app.add_middleware(ExecFastPath)
    app.add_middleware(Idempotency)  # inside RequestContext: bodies bounded, ids given
    app.add_middleware(RequestContext, max_body=settings.max_request_bytes)
    # In front of it: request ids, metrics, the request log line and the audit log.
    app.add_middleware(
        Observe,
        redactor=Redactor([settings.admin_key, settings.admin_password]),
        log_format=settings.log_format,
    )
    app.mount("/docs/static", StaticFiles(directory=str(swagger_ui_path)), name="docs-static")
    app.include_router(system.router)
    # Ahead of the native routes of the same paths: run-dat-sheesh's /v1/images and
    # /v1/snapshots, for requests in its auth style only (faces/rundatsheesh/stores.py).
    app.include_router(rundatsheesh.claimed)
    # Every native operation documents the errors it may answer (the faces document their own).
    native_errors = errors.error_responses()
    for module in (sandboxes, commands, streams, files, run, tokens, nodes, volumes, snapshots,
                   images, audit, webhooks, secrets):  # fmt: skip
        app.include_router(module.router, responses=native_errors)
    app.include_router(observe.router, responses=native_errors)  # /metrics
    app.include_router(snapshots.sandbox_router, responses=native_errors)
    app.include_router(sandboxes.templates_router, responses=native_errors)
    # Sandbox ports: the API, and the proxy in front of everything (it streams bodies itself).
    app.include_router(ports_router, responses=native_errors)
    app.add_middleware(PortProxy, public_domain=settings.public_domain)
    # In front of the proxy: E2B's api.<domain> and 49983-<id>.<domain> are the E2B face's.
    app.add_middleware(E2bHosts, public_domain=settings.public_domain)
    for face in (cmdio, cmdop, rundatsheesh, runta, vercel, e2b):
        app.include_router(face.router)
    # The web console: its pages, assets and sign-in (corral.api.console).
    from corral.api.console import routes as console

    app.mount("/console/static", console.assets(), name="console-static")
    app.include_router(console.router)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    return app


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, without the validation-error body it adds to operations on its own:
    every operation documents its real 422 (or, on a face that answers validation errors with
    another status, none)."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        if "ErrorResponse" not in schemas:  # the native routes' error body, referenced below
            native = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(native.pop("$defs", {}))
            schemas["ErrorResponse"] = native
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                invalid = responses.get("422", {})
                if FASTAPI_422 in json.dumps(invalid):
                    del responses["422"]
                # Refused by the HTTP server before any route runs: the native shape everywhere.
                for status, description in PROTOCOL_REFUSALS.items():
                    responses.setdefault(
                        str(status),
                        {
                            "description": description + " (refused before routing; native shape)",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                                }
                            },
                        },
                    )
        if FASTAPI_422 not in json.dumps(document.get("paths", {})):
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
        app.openapi_schema = document
    return app.openapi_schema
