#!/usr/bin/env bash
# The README's test command: set up (idempotent), then lint and run the test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bootstrap.sh
ruff check .
# Two workers, each test file whole on one (module-scoped fixtures such as a Ray session are
# built once): most of the suite's time is Ray start-ups and subprocess waits, which overlap.
# The 15 slowest tests are listed at the end: the suite must stay well under 15 minutes.
python -m pytest -n 2 --dist loadfile --durations=15 "$@"
