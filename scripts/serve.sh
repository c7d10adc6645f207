#!/usr/bin/env bash
# Sets everything up, then starts Corral on the embedded default (local node, SQLite).
# Extra arguments go to `corral serve` (e.g. --port 9000 --data-dir /var/lib/corral).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/corral serve --host "${CORRAL_HOST:-127.0.0.1}" "$@"
