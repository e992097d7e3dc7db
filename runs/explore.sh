#!/usr/bin/env bash
# When does exploration help? Both toy worlds, from a fresh clone, everything under runs/:
#   1. the first world (runs/toy) and the premise world (runs/toy_premise): build, VAE, both
#      warm-ups, the main job's two RL runs (runs/toy.sh with QUICK=1)
#   2. the premise checks in each world, before any RL comparison (python -m toy.premise)
#   3. the exploration comparison in each world (python -m toy.compare): ten arms x five seeds x
#      20 RL steps, the protocol fixed in toy/compare.py and written to <world>/compare/protocol.md
#      before the first run
#   4. both worlds side by side in runs/toy/compare/summary.md (README=1: into README.md and docs/,
#      the maintainers' step)
# About 2 hours on the 2-core machine: the first world's build and stages about 25 minutes, the
# premise world's about 31 (its base model trains longer), each world's premise checks 2, each
# world's comparison 30 (two runs at a time; 29m47s measured for the premise world). QUICK=1 is
# the reduced version: two seeds of 8 steps, into <world>/compare_quick (about 6 minutes a world,
# so about 70 minutes from a fresh clone, most of it the worlds; its numbers are a smoke test, not
# results). A stage whose output exists is skipped, so a rerun continues where it stopped; with
# everything built, README=1 only rewrites the README section and pictures (about a minute).
#   bash runs/explore.sh
#   QUICK=1 bash runs/explore.sh
#   README=1 bash runs/explore.sh
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=1 bash runs/toy.sh
SETTING=premise QUICK=1 bash runs/toy.sh
for W in runs/toy runs/toy_premise; do
    [ -f $W/premise/premise.json ] || python -m toy.premise --world $W
done
if [ "${QUICK:-0}" = 1 ]; then NAME=compare_quick; FLAGS="--seeds 2 --steps 8"; else NAME=compare; FLAGS=""; fi
for W in runs/toy runs/toy_premise; do
    python -m toy.compare --world $W --out $W/$NAME $FLAGS
done
python -m toy.compare --summarise runs/toy/$NAME,runs/toy_premise/$NAME ${README:+--readme}
