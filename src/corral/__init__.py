"""Corral: isolated sandboxes that run commands over HTTP.

    import corral

    with corral.Client() as client:
        sandbox = client.create_sandbox(name="demo")
        result = client.exec(sandbox, "echo hello")
        print(result.exit_code, result.stdout)

Importing this package loads the SDK and the wire models only, never the server.
"""

from corral.client import (
    APIError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ClientClosedError,
    CommandError,
    ConfigError,
    ConflictError,
    ConnectError,
    ConnectTimeout,
    CorralError,
    DecodingError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PoolTimeout,
    RateLimitError,
    ReadTimeout,
    SandboxNotRunningError,
    ServerError,
    TransportError,
    TransportTimeout,
    UnavailableError,
    ValidationError,
    WriteTimeout,
    raise_for_status,
)
from corral.client._forward import PortForward
from corral.core.models import (
    Command,
    CommandStatus,
    Health,
    Image,
    Node,
    NodeState,
    Port,
    PortUrl,
    Sandbox,
    SandboxState,
    Scope,
    Snapshot,
    SnapshotState,
    Token,
    TokenCreated,
    Volume,
    VolumeMount,
)
from corral.core.webhook_wire import Webhook, WebhookAttempt
from corral.core.webhook_wire import verify as verify_webhook

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ClientClosedError",
    "Command",
    "CommandError",
    "CommandStatus",
    "ConfigError",
    "ConflictError",
    "ConnectError",
    "ConnectTimeout",
    "CorralError",
    "DecodingError",
    "Health",
    "Image",
    "Node",
    "NodeState",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PoolTimeout",
    "Port",
    "PortForward",
    "PortUrl",
    "RateLimitError",
    "ReadTimeout",
    "Sandbox",
    "SandboxNotRunningError",
    "SandboxState",
    "Scope",
    "ServerError",
    "Snapshot",
    "SnapshotState",
    "Token",
    "TokenCreated",
    "TransportError",
    "TransportTimeout",
    "UnavailableError",
    "ValidationError",
    "Volume",
    "VolumeMount",
    "Webhook",
    "WebhookAttempt",
    "WriteTimeout",
    "__version__",
    "raise_for_status",
    "verify_webhook",
]
