#!/usr/bin/env bash
# Sets everything up, then runs the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests
.venv/bin/python -m pytest "$@"
