"""`/v1/nodes`: the hosts that run sandboxes, their state and load, and drain."""

from __future__ import annotations

from fastapi import APIRouter

from corral.api.auth import Caller, ServicesDep
from corral.core.models import Node, Page, Scope

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])


@router.get("", response_model=Page[Node])
async def list_nodes(services: ServicesDep, caller: Caller) -> Page[Node]:
    """Every node the store knows: `online`, `offline` (silent for longer than
    CORRAL_NODE_LOST_AFTER_S) or `draining`, with capacity, load and last heartbeat."""
    caller.require(Scope.read)
    return Page[Node](items=await services.nodes.list())


@router.get("/{node_id}", response_model=Node)
async def get_node(node_id: str, services: ServicesDep, caller: Caller) -> Node:
    caller.require(Scope.read)
    return await services.nodes.get(node_id)


@router.post("/{node_id}/drain", response_model=Node)
async def drain_node(node_id: str, services: ServicesDep, caller: Caller) -> Node:
    """No new sandboxes go to the node; those it holds keep running until deleted."""
    caller.require(Scope.admin)
    return await services.nodes.set_draining(node_id, True)


@router.post("/{node_id}/undrain", response_model=Node)
async def undrain_node(node_id: str, services: ServicesDep, caller: Caller) -> Node:
    """The node takes new sandboxes again."""
    caller.require(Scope.admin)
    return await services.nodes.set_draining(node_id, False)
