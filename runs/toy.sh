#!/usr/bin/env bash
# The main job on the embedded toy world, end to end on a CPU:
#   1. build the world (task data, char tokenizer, tiny Qwen3-shaped base model) unless built
#   2. train the VAE over math / code / qa traces            (train_vae.py)
#   3. the prefix warm-up, and the plain warm-up for baselines (sft_warmup.py)
#   4. RL: plain GRPO baseline and the linear schedule (rl.py; L = 1, the length the warm-up
#      taught: this tiny model cannot read 8 prefix tokens, see the report)
#   5. look at the palette: greedy completions under 4 latents (infer.py)
#   6. the report on the paper's three claims, written into README.md (toy/report.py)
# Every step skips work whose output already exists, so a rerun continues where it stopped.
#   bash runs/toy.sh                 # everything under runs/toy/
#   QUICK=1 bash runs/toy.sh         # steps 1-5 only (no multi-seed report)
set -euo pipefail
cd "$(dirname "$0")/.."
W=runs/toy
D=$W/data

python -m toy.build_world --out $W

[ -f $W/vae/vae.json ] || python train_vae.py --model $W/base --out $W/vae \
    --data math=$D/vae_math.jsonl,code=$D/vae_code.jsonl,qa=$D/vae_qa.jsonl

[ -f $W/sft/model/config.json ] || python sft_warmup.py --model $W/base --vae $W/vae --out $W/sft \
    --data $D/math_train.jsonl --eval-data $D/math_test.jsonl --lr 3e-5
[ -f $W/sft_plain/model/config.json ] || python sft_warmup.py --model $W/base --prefix-source none \
    --out $W/sft_plain --data $D/math_train.jsonl --lr 3e-5

RL="--data $D/math_train.jsonl --eval-data $D/math_test.jsonl --steps 40 --prompts-per-step 16 --group-size 8 --lr 2e-5 --max-new-tokens 64 --eval-every 10"
[ -f $W/rl_none/model/config.json ] || python rl.py --model $W/sft_plain/model --schedule none \
    --prefix-source none --out $W/rl_none $RL
[ -f $W/rl_linear/model/config.json ] || python rl.py --model $W/sft/model --vae $W/vae \
    --schedule linear --L 1 --out $W/rl_linear $RL

python infer.py --model $W/sft/model --vae $W/vae --prompt "47+38=?" --prompt "268+157=?" \
    --num-latents 4 --L 1 --max-new-tokens 64

[ "${QUICK:-0}" = 1 ] || python -m toy.report --world $W
