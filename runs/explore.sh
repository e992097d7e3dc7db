#!/usr/bin/env bash
# When does exploration help? The second protocol, in the premise world, from a fresh clone, under
# runs/toy_premise/:
#   1. the premise world (toy.build_world --setting premise) and its VAE (train_vae.py)
#   2. the premise checks (toy.premise): strategy shares, forced strategies, prefix sources, and
#      the premise at the rollout temperature, which picks the temperature every arm samples at
#   3. the comparison (toy.compare): warm-ups seeded so that ripple is learnable, the lr sweep and
#      the positive control on plain GRPO, then seven arms x five seeds; the protocol is fixed in
#      toy/compare.py and written to compare/protocol.md before the first run; then its follow-up,
#      plain GRPO from the prefix warm-ups (compare/follow_up.md)
#   4. the report (compare/report.md; PUBLISH=1: docs/results/explore.md and the README's headline,
#      the maintainers' step)
# The first protocol (both worlds, 10 arms x 5 seeds x 20 steps) ran at commit 6d22ca5; its results
# are in docs/results/explore_first_protocol.md. A step whose output exists is skipped, so a rerun
# continues where it stopped. QUICK=1 is a smoke test (2 seeds of 8 steps, one lr), into
# compare_quick/: its numbers are not results.
# CREDIT=1 runs, after the world and its VAE, only the credit follow-up (toy/credit_transfer.py: plain
# GRPO against palette linear under each credit rule, at the comparison's settings, five seeds).
#   bash runs/explore.sh
#   QUICK=1 bash runs/explore.sh
#   PUBLISH=1 bash runs/explore.sh
#   CREDIT=1 [PUBLISH=1] bash runs/explore.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
# the world and its VAE build the same on any x86 CPU with AVX2 (runs/toy.sh says why); the many short RL
# runs after them keep MKL's fast path (its reproducible mode would double their hours), so on another
# CPU their sums may round otherwise
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2}
W=runs/toy_premise
D=$W/data
MKL_CBWR=${MKL_CBWR:-COMPATIBLE} python -m toy.build_world --out $W --setting premise
[ -f $W/vae/vae.json ] || MKL_CBWR=${MKL_CBWR:-COMPATIBLE} python train_vae.py --model $W/base --out $W/vae \
    --data math=$D/vae_math.jsonl,code=$D/vae_code.jsonl,qa=$D/vae_qa.jsonl
if [ "${CREDIT:-0}" = 1 ]; then
    python -m toy.credit_transfer --world $W
    python -m toy.credit_transfer --summarise $W/compare_credit ${PUBLISH:+--publish}
    exit 0
fi
[ -f $W/premise/premise.json ] || python -m toy.premise --world $W
if [ "${QUICK:-0}" = 1 ]; then
    python -m toy.compare --world $W --quick
    python -m toy.compare --summarise $W/compare_quick
else
    python -m toy.compare --world $W
    python -m toy.compare --summarise $W/compare ${PUBLISH:+--publish}
fi
