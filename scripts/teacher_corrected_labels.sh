#!/usr/bin/env bash
# Issue #18, session 17: the most-trained teacher (training_state/hq_teacher_cont_step3000.pt: 4,000 + 3,000 steps,
# all before session 15 corrected the phantom labels, which were off their images) continued on the corrected
# stream, as the first step of rebuilding the shipped recipe on it (then, as in scripts/build_default_model.sh:
# distillation, memory fine-tuning, click maps, geodesic click maps, bank). Resumable: run it again.
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/memsam
test -f data/eval/dataset.json || $M data fetch --out data/eval
$M train --config memsam_hq_teacher --init training_state/hq_teacher_cont_step3000.pt --data data/eval \
  --steps 2500 --lr 2e-4 --seed 3 --log-every 25 --checkpoint-every 100 --keep-every 500 --procedural 0.4 \
  --synthetic 0.2 --out runs/hq_teacher_fixed
