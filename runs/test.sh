#!/usr/bin/env bash
# Set up (runs/setup.sh), then run the tests. Extra arguments go to pytest:
#   bash runs/test.sh                          # the whole suite
#   bash runs/test.sh tests/test_common.py -q  # one file
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
PY=$(command -v python || command -v python3)
exec "$PY" -m pytest -q --durations=15 "$@"
