#!/usr/bin/env bash
# Regenerates the E2B face's protobuf modules (src/corral/api/faces/e2b/pb/*_pb2.py) from the
# .proto files beside them. Needs grpcio-tools matching the pinned protobuf runtime (the
# generated code checks the runtime's major version): grpcio-tools 1.85.1 for protobuf 7.36.2.
#   python -m venv /tmp/protoc && /tmp/protoc/bin/pip install grpcio-tools==1.85.1
#   PROTOC_PYTHON=/tmp/protoc/bin/python scripts/gen-e2b-protos.sh
set -euo pipefail
cd "$(dirname "$0")/../src/corral/api/faces/e2b/pb"
"${PROTOC_PYTHON:-python3}" -m grpc_tools.protoc -I . --python_out=. process.proto filesystem.proto
