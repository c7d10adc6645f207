"""The ASGI application factory. Nothing is built at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from corral import __version__
from corral.api import errors
from corral.api.faces import cmdio, cmdop, rundatsheesh, runta, vercel
from corral.api.middleware import RequestContext
from corral.api.routes import commands, files, nodes, run, sandboxes, streams, system, tokens
from corral.services import Services
from corral.settings import Settings

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
    app.add_middleware(RequestContext, max_body=settings.max_request_bytes)
    app.mount("/docs/static", StaticFiles(directory=str(swagger_ui_path)), name="docs-static")
    for module in (system, sandboxes, commands, streams, files, run, tokens, nodes):
        app.include_router(module.router)
    app.include_router(sandboxes.templates_router)
    for face in (cmdio, cmdop, rundatsheesh, runta, vercel):
        app.include_router(face.router)
    return app
