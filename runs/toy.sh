#!/usr/bin/env bash
# The main job on the embedded toy world, end to end on a CPU, from a fresh clone:
#   0. set up the Python packages (runs/setup.sh: pinned torch first; a no-op once installed)
#   1. build the world (task data, char tokenizer, tiny Qwen3-shaped base model) unless built
#   2. train the VAE over math / code / qa traces            (train_vae.py)
#   3. the prefix warm-up, and the plain warm-up for baselines (sft_warmup.py)
#   4. RL: plain GRPO baseline and the linear schedule (rl.py; L = 1, the length the warm-up
#      taught: this tiny model cannot read 8 prefix tokens, see the report)
#   5. look at the palette: greedy completions under 4 latents (infer.py)
#   6. the report on the paper's three claims, under runs/toy/report/ (toy/report.py; it leaves
#      README.md alone: `python -m toy.report --world runs/toy --readme` is the maintainers' step)
# Everything is written under runs/toy/; no tracked file changes. A stage whose output exists is
# skipped, so a rerun continues where it stopped: an RL run with a checkpoint resumes from it,
# and a stage stopped part-way (Ctrl-C) without one starts again.
#   bash runs/toy.sh                 # everything under runs/toy/
#   QUICK=1 bash runs/toy.sh         # steps 0-5 only (no multi-seed report)
#   SETTING=premise QUICK=1 bash runs/toy.sh   # the same steps in the premise world, runs/toy_premise/
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
SETTING=${SETTING:-default}
case $SETTING in
    default) W=runs/toy ;;
    premise) W=runs/toy_premise ;;
    *) echo "error: SETTING=$SETTING; choose default or premise" >&2; exit 2 ;;
esac
D=$W/data

# a live process holds DIR/.lock (the OS frees it when the process ends): a run works in DIR now
running_in() {
    [ -f "$1/.lock" ] && ! python -c "import sys, filelock; filelock.FileLock(sys.argv[1]).acquire(timeout=0)" "$1/.lock" 2>/dev/null
}

# stage DIR DONE_FILE command...: skip the stage if DIR/DONE_FILE exists; resume it if DIR holds a
# checkpoint; if DIR holds what a stopped run left (and no run works there now), start it again
stage() {
    local dir=$1 done=$2
    shift 2
    if [ -f "$dir/$done" ]; then
        echo "== $dir is done: skipping ($*)"
    elif ls -d "$dir"/checkpoint-* >/dev/null 2>&1; then
        echo "== $dir: resuming from its checkpoint"
        "$@" --resume
    else
        if [ -d "$dir" ] && ! running_in "$dir"; then
            echo "== $dir was stopped part-way: starting it again"
            rm -rf "$dir"
        fi
        "$@"
    fi
}

python -m toy.build_world --out $W --setting $SETTING

stage $W/vae vae.json python train_vae.py --model $W/base --out $W/vae \
    --data math=$D/vae_math.jsonl,code=$D/vae_code.jsonl,qa=$D/vae_qa.jsonl

stage $W/sft model/config.json python sft_warmup.py --model $W/base --vae $W/vae --out $W/sft \
    --data $D/math_train.jsonl --eval-data $D/math_test.jsonl --lr 3e-5
stage $W/sft_plain model/config.json python sft_warmup.py --model $W/base --prefix-source none \
    --out $W/sft_plain --data $D/math_train.jsonl --lr 3e-5

RL="--data $D/math_train.jsonl --eval-data $D/math_test.jsonl --steps 40 --prompts-per-step 16 --group-size 8 --lr 2e-5 --max-new-tokens 64 --eval-every 10"
stage $W/rl_none model/config.json python rl.py --model $W/sft_plain/model --schedule none \
    --prefix-source none --out $W/rl_none $RL
stage $W/rl_linear model/config.json python rl.py --model $W/sft/model --vae $W/vae \
    --schedule linear --L 1 --out $W/rl_linear $RL

python infer.py --model $W/sft/model --vae $W/vae --prompt "47+38=?" --prompt "268+157=?" \
    --num-latents 4 --L 1 --max-new-tokens 64

[ "${QUICK:-0}" = 1 ] || python -m toy.report --world $W
