#!/usr/bin/env bash
# The main job on the embedded toy world: build the world (task data, tokenizer, tiny base model)
# if it is not built yet, then run every stage end to end. CPU by default; minutes.
#   bash runs/toy.sh                 # everything under runs/toy/
set -euo pipefail
cd "$(dirname "$0")/.."
python -m toy.task          # one worked example of every strategy of every domain
