"""Running the server: what `corral serve` does, callable from Python too.

The server is uvicorn on uvloop with the httptools parser, through `BoundedHttpToolsProtocol`
(api/http_protocol.py): uvicorn's own protocol plus a request head deadline, head size caps and
a bound on open connections, which uvicorn's options do not give. Every log handler goes
through the redacting filter (redaction.py).
"""

from __future__ import annotations

from corral.settings import Settings

# On shutdown, requests still open after this long are cut: log streams and waits would
# otherwise hold the server up until their commands end. Their clients resume elsewhere or
# later; commands still running end as `lost` when the sandboxes stop.
GRACEFUL_SHUTDOWN_SECONDS = 5
WS_MAX_QUEUE = 4  # frames received and not yet read, per WebSocket
WS_OVERSIZE_SEEN = 4  # frames up to this many times the limit reach the route, to be refused

LISTEN_BACKLOG = 4096


def run_server(*, settings: Settings | None = None) -> None:
    """Serve the API with `settings` (default: read from `CORRAL_*` variables) until interrupted.

    Blocks; uvicorn handles SIGINT and SIGTERM and shuts the server down in order.
    """
    # Imported here so that the SDK and the other CLI commands never load the server.
    import uvicorn

    from corral.api.app import create_app
    from corral.api.http_protocol import (
        BoundedHttpToolsProtocol,
        connection_limits,
        raise_descriptor_limit,
    )
    from corral.redaction import Redactor, log_config

    settings = settings or Settings()
    # Idle clients must meet the connection bound, never the descriptor limit.
    limits = connection_limits(
        raise_descriptor_limit(),
        head_timeout=settings.request_head_timeout_seconds,
        max_connections=settings.max_connections,
    )
    redactor = Redactor([settings.admin_key, _kept_admin_key(settings), settings.admin_password])
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=BoundedHttpToolsProtocol.configured(limits),
        lifespan="on",
        # Room for a burst of connections (a flood reconnecting at once) beside real clients:
        # a full accept queue drops SYNs, which cost a client a 1 s retransmit.
        backlog=LISTEN_BACKLOG,
        # Off: the server sees peers directly; a proxy's X-Forwarded-For must not be trusted.
        proxy_headers=False,
        log_config=log_config(settings.log_level, redactor, settings.log_format),
        access_log=False,  # api/observe.py writes one line per request instead
        log_level=settings.log_level.lower(),
        timeout_keep_alive=settings.keep_alive_seconds,
        # The routes refuse a frame over CORRAL_WS_MAX_FRAME_BYTES in their face's shape; the
        # server drops anything larger still (1009) and queues few frames per connection, so
        # that one WebSocket cannot hold much more than a frame or two in memory.
        ws_max_size=settings.ws_max_frame_bytes * WS_OVERSIZE_SEEN,
        ws_max_queue=WS_MAX_QUEUE,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        # HTTPS by Corral itself (e.g. a wildcard certificate for the ports' host form).
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
    )


def _kept_admin_key(settings: Settings) -> str | None:
    """The admin key kept in the data dir by an earlier start (a new one is a `crl_` token,
    which the redactor knows by its form)."""
    try:
        return (settings.data_dir / "admin.key").read_text().strip() or None
    except OSError:
        return None
