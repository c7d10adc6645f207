"""Running the server: what `corral serve` does, callable from Python too."""

from __future__ import annotations

from corral.settings import Settings

# On shutdown, requests still open after this long are cut: log streams and waits would
# otherwise hold the server up until their commands end. Their clients resume elsewhere or
# later; commands still running end as `lost` when the sandboxes stop.
GRACEFUL_SHUTDOWN_SECONDS = 5


def run_server(*, settings: Settings | None = None) -> None:
    """Serve the API with `settings` (default: read from `CORRAL_*` variables) until interrupted.

    Blocks; uvicorn handles SIGINT and SIGTERM and shuts the server down in order.
    """
    # Imported here so that the SDK and the other CLI commands never load the server.
    import uvicorn

    from corral.api.app import create_app

    settings = settings or Settings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        # Off: the server sees peers directly; a proxy's X-Forwarded-For must not be trusted.
        proxy_headers=False,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
