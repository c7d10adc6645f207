"""The E2B face: the control API (`control.py`, under `/e2b`) and the in-sandbox daemon
protocol (`envd.py`, under `/e2b/envd`: Connect RPC in `connect.py`, `process.py` and
`filesystem.py`, over the protobuf messages in `pb/`), as the `e2b` SDK calls them with
`E2B_API_URL=<corral>/e2b` and `E2B_SANDBOX_URL=<corral>/e2b/envd`.

The protocol's messages are protobuf classes compiled from `.proto` files written for Corral
(field names and numbers as in the SDK's own generated stubs) and committed with the generated
`*_pb2.py` (`scripts/gen-e2b-protos.sh` regenerates them): protobuf's JSON mapping then reads
and writes exactly what a Connect client sends, with no code generator at install time and no
dependency on the SDK. The Connect framing itself is small (`connect.py`), and written here
rather than taken from a Connect server library: the maintained Python one builds on another
protobuf runtime and its own ASGI application, where this face needs FastAPI routes that find
the sandbox from a header and answer in each route's error shape.
"""

from fastapi import APIRouter

from corral.api.faces.e2b import control, envd

router = APIRouter()
router.include_router(control.router)
router.include_router(envd.router)

__all__ = ["control", "envd", "router"]
