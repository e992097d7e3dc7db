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
#   bash runs/explore.sh
#   QUICK=1 bash runs/explore.sh
#   PUBLISH=1 bash runs/explore.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash runs/setup.sh
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2} MKL_CBWR=${MKL_CBWR:-COMPATIBLE}   # as in runs/toy.sh
W=runs/toy_premise
D=$W/data
python -m toy.build_world --out $W --setting premise
[ -f $W/vae/vae.json ] || python train_vae.py --model $W/base --out $W/vae \
    --data math=$D/vae_math.jsonl,code=$D/vae_code.jsonl,qa=$D/vae_qa.jsonl
[ -f $W/premise/premise.json ] || python -m toy.premise --world $W
if [ "${QUICK:-0}" = 1 ]; then
    python -m toy.compare --world $W --quick
    python -m toy.compare --summarise $W/compare_quick
else
    python -m toy.compare --world $W
    python -m toy.compare --summarise $W/compare ${PUBLISH:+--publish}
fi
