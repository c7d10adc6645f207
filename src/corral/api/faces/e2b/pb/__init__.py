"""Protobuf messages of the E2B in-sandbox daemon protocol: `process.proto` and
`filesystem.proto` (written for Corral from the field names and numbers of the e2b SDK's own
generated stubs), compiled by `scripts/gen-e2b-protos.sh` into the `*_pb2.py` modules here."""
