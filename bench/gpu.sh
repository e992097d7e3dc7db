#!/usr/bin/env bash
# Every GPU figure in one command (bench/gpu.py; docs/gpu.md says what it measures and needs):
#   bash bench/gpu.sh                    # on an H100 or H200: docs/results/gpu.md and gpu.json, under 8 minutes
#   bash bench/gpu.sh --out DIR          # the same into DIR (e.g. $OUT on a lent machine)
#   bash bench/gpu.sh --smoke            # the same code paths at tiny shapes on the CPU, under a minute
# The results are rewritten after every section and each section's files are deleted when it ends,
# so a run cut short keeps what it finished and the machine's disk never holds more than one section's;
# each section frees the KV caches and GPU memory it made, and a row that fails (out of memory, say)
# is recorded with the rows before it kept. Exit status 1 if any row failed or a check broke (the
# "FAILED section: reason" lines on stderr), once every section has run.
# Wheels in bench/wheels/ (trl and what it needs beyond the GPU image: docs/gpu.md) are installed first,
# without their dependencies, so that nothing replaces the machine's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3 || command -v python)
if ls bench/wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-index bench/wheels/*.whl
fi
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/nanopalette-inductor}
export PYTHONUNBUFFERED=1      # each section's line appears as it ends, also in a log cut off by a timeout
exec "$PY" bench/gpu.py "$@"
