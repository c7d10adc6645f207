"""Sandbox ports at a URL: the API that exposes them (routes), the proxy that serves them over
HTTP and WebSocket in both URL forms (proxy), and the raw TCP tunnel port-forward uses (tcp)."""

from corral.api.ports.proxy import PortProxy
from corral.api.ports.routes import router

__all__ = ["PortProxy", "router"]
