"""`/v1/sandboxes/{id}/ports`: expose, list and unexpose a sandbox's ports; signed URLs for them;
`/v1/sandboxes/{id}/tcp/{port}`: a raw TCP connection to any port over a WebSocket.

Scopes: listing needs `read`, exposing and unexposing `sandboxes`, a signed URL and the TCP tunnel
`exec` (what reaching a private port takes).
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from corral.api import ws
from corral.api.auth import Caller, ServicesDep, usable_sandbox
from corral.api.ports import tcp
from corral.core.errors import CorralError, NotFound
from corral.core.models import Port, PortExpose, PortNumber, PortUrl, PortUrlCreate, Scope
from corral.services import Services

router = APIRouter(prefix="/v1/sandboxes/{sandbox}", tags=["ports"])


@router.post("/ports", status_code=201, response_model=Port)
async def expose_port(
    sandbox: str, body: PortExpose, services: ServicesDep, caller: Caller
) -> Port:
    """Serve the port at its URLs (again: `public` is updated). Whether anything listens on it
    is not checked: a service may start later."""
    caller.require(Scope.sandboxes)
    row = await usable_sandbox(services, caller, sandbox)
    return await services.ports.expose(row, body)


@router.get("/ports", response_model=list[Port])
async def list_ports(sandbox: str, services: ServicesDep, caller: Caller) -> list[Port]:
    caller.require(Scope.read)
    row = await usable_sandbox(services, caller, sandbox)
    return await services.ports.list(row.id)


@router.delete("/ports/{port}", response_model=Port)
async def unexpose_port(
    sandbox: str, port: PortNumber, services: ServicesDep, caller: Caller
) -> Port:
    """Stop serving the port; connections open through it run on until they end."""
    caller.require(Scope.sandboxes)
    row = await usable_sandbox(services, caller, sandbox)
    return await services.ports.remove(row.id, port)


@router.post("/port-urls", status_code=201, response_model=PortUrl)
async def sign_port_url(
    sandbox: str, body: PortUrlCreate, services: ServicesDep, caller: Caller
) -> PortUrl:
    """A URL of an exposed port that works without a token until it expires (its first visit
    sets a cookie for the rest of the site, valid as long)."""
    caller.require(Scope.exec)
    row = await usable_sandbox(services, caller, sandbox)
    if await services.ports.exposed(row.id, body.port) is None:
        raise NotFound(f"port {body.port} of sandbox {row.id} is not exposed")
    return services.ports.signed(row.id, body.port, body.expires_in)


@router.websocket("/tcp/{port}")
async def tcp_tunnel(websocket: WebSocket, sandbox: str, port: str) -> None:
    """Bytes to and from 127.0.0.1:`port` inside the sandbox, as binary frames both ways (an
    empty binary frame from the client ends its direction). The port need not be exposed."""
    services: Services = websocket.app.state.services
    caller = await ws.authenticate(websocket, services)
    if caller is None:
        return
    try:
        caller.require(Scope.exec)
        number = tcp.port_number(port)
        row = await usable_sandbox(services, caller, sandbox)
    except CorralError as exc:
        await ws.refuse(websocket, exc)
        return
    await tcp.serve(websocket, services, caller, row, number)
