#!/usr/bin/env bash
# The main job on the embedded toy world, end to end on a CPU, from a fresh clone:
#   0. set up the Python packages (runs/setup.sh: pinned torch first; a no-op once installed)
#   1. build the world (task data, char tokenizer, tiny Qwen3-shaped base model) unless built
#   2. train the VAE over math / code / qa traces            (train_vae.py)
#   3. the prefix warm-up, and the plain warm-up for baselines (sft_warmup.py)
#   4. RL: plain GRPO baseline and the linear schedule (rl.py; L = 1, the length the warm-up
#      taught: this tiny model cannot read 8 prefix tokens, see the report)
#   5. look at the palette: greedy completions under 4 latents (infer.py; also in palette.jsonl)
#   6. the report on the paper's three claims, under runs/toy/report/ (toy/report.py; it leaves
#      README.md alone: `python -m toy.report --world runs/toy --publish` is the maintainers' step)
# Everything is written under runs/toy/ (or the directory named below); no tracked file changes.
# A stage whose output exists is skipped, so a rerun continues where it stopped: an RL run with a
# checkpoint resumes from it, and a stage stopped part-way (Ctrl-C) without one starts again.
#   bash runs/toy.sh                 # everything under runs/toy/
#   QUICK=1 bash runs/toy.sh         # steps 0-5 only (no multi-seed report)
#   SETTING=premise QUICK=1 bash runs/toy.sh   # the same steps in the premise world, runs/toy_premise/
#   TINY=1 bash runs/toy.sh          # every step on a tiny world, runs/toy_tiny/, in about 100 s
#   BUILD_SEED=1 bash runs/toy.sh    # another build of the world (its data and weights), runs/toy_build1/
# TINY=1 is the smoke test of this script (tests/test_toy_sh.py runs it; on a GPU, docs/gpu.md): the
# same lines at the sizes below, with a one-seed report. Its numbers only show that each stage ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
# Results that another CPU reproduces: with ATen's AVX2 kernels and MKL's reproducible mode, every x86
# CPU with AVX2 (Intel or AMD, AVX2 or AVX-512, 1 to 8 threads) sums in the same order, so a build gives
# the same world everywhere; without them MKL and ATen pick kernels by CPU, and 900 steps of
# pretraining turn the last bits into another world (docs/results/toy.md). The cost: about 2x.
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2} MKL_CBWR=${MKL_CBWR:-COMPATIBLE}
SETTING=${SETTING:-default}
case $SETTING in
    default) W=runs/toy ;;
    premise) W=runs/toy_premise ;;
    *) echo "error: SETTING=$SETTING; choose default or premise" >&2; exit 2 ;;
esac
# what TINY=1 makes smaller: a world of 0.01M parameters that learns the format but not the sums,
# a few steps of each stage, one seed in the report
WORLD="" VAE="" SFT="" SFT_EVAL="" REPORT="" RL_STEPS=40 PER_STEP="--prompts-per-step 16 --group-size 8"
if [ "${TINY:-0}" = 1 ]; then
    W=${W}_tiny
    # one thread: a model this small runs several times faster on one than on two, and when another
    # process shares the cores two threads made an RL step 10x slower here (OMP_NUM_THREADS wins)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    WORLD="--size tiny --steps 400 --warmup 20 --batch-size 32 --lr 1e-2 --n-pretrain 2000
           --n-math-train 200 --n-math-test 100 --n-vae 50 --n-eval 40"
    VAE="--steps 100 --batch-size 32"
    SFT="--steps 2 --batch-size 8" SFT_EVAL="--eval-problems 10 --eval-max-new-tokens 64"
    REPORT="--seeds 1 --eval-problems 10 --n 4"
    RL_STEPS=6 PER_STEP="--prompts-per-step 4 --group-size 4"
fi
BUILD_SEED=${BUILD_SEED:-0}
[ "$BUILD_SEED" = 0 ] || W=${W}_build$BUILD_SEED
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

python -m toy.build_world --out $W --setting $SETTING --seed $BUILD_SEED $WORLD

stage $W/vae vae.json python train_vae.py --model $W/base --out $W/vae \
    --data math=$D/vae_math.jsonl,code=$D/vae_code.jsonl,qa=$D/vae_qa.jsonl $VAE

stage $W/sft model/config.json python sft_warmup.py --model $W/base --vae $W/vae --out $W/sft \
    --data $D/math_train.jsonl --eval-data $D/math_test.jsonl --lr 3e-5 $SFT $SFT_EVAL
stage $W/sft_plain model/config.json python sft_warmup.py --model $W/base --prefix-source none \
    --out $W/sft_plain --data $D/math_train.jsonl --lr 3e-5 $SFT

RL="--data $D/math_train.jsonl --eval-data $D/math_test.jsonl --steps $RL_STEPS $PER_STEP --lr 2e-5 --max-new-tokens 64 --eval-every 10"
stage $W/rl_none model/config.json python rl.py --model $W/sft_plain/model --schedule none \
    --prefix-source none --out $W/rl_none $RL
stage $W/rl_linear model/config.json python rl.py --model $W/sft/model --vae $W/vae \
    --schedule linear --L 1 --out $W/rl_linear $RL

python infer.py --model $W/sft/model --vae $W/vae --prompt "47+38=?" --prompt "268+157=?" \
    --num-latents 4 --L 1 --max-new-tokens 64 --out $W/palette.jsonl

[ "${QUICK:-0}" = 1 ] || python -m toy.report --world $W --rl-steps $RL_STEPS \
    --rl-flags "$PER_STEP --lr 2e-5 --max-new-tokens 64" $REPORT
