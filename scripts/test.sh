#!/usr/bin/env bash
# The README's test command: set up (idempotent), then lint and run the test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bootstrap.sh
ruff check .
python -m pytest "$@"
