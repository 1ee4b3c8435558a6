#!/usr/bin/env bash
# With and without the high-resolution mask-head features (issue #18): the shipped recipe's teacher
# (memsam_hq_teacher, scripts/build_default_model.sh step 1) against the same teacher without them
# (memsam_small_teacher), trained on the same endless mixed stream (same seed, steps, schedule and batch: the
# samples are drawn from (seed, step, index)), then both evaluated on the held-out split with our protocol.
# Resumable: run it again after an interruption. About 90 min of training on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/memsam
MIX="--procedural 0.4 --synthetic 0.2"
test -f data/eval/dataset.json || $M data fetch --out data/eval
test -f runs/hq_teacher/train_step4000.pt || { echo "run scripts/build_default_model.sh first (the hq teacher)"; exit 1; }
$M train --config memsam_small_teacher --data data/eval --steps 4000 --log-every 25 --checkpoint-every 100 \
  --keep-every 1000 $MIX --out runs/ablation_nohires_teacher
for run in hq_teacher ablation_nohires_teacher; do
  $M evaluate --model runs/$run/train_step4000.pt --data data/eval --clicks 10 --sources pyradiomics,mricron \
    --montage 0 --out out/ablation/${run}_real
  $M evaluate --model runs/$run/train_step4000.pt --data data/eval --clicks 10 --sources phantom \
    --montage 0 --out out/ablation/${run}_phantom
done
.venv/bin/python scripts/training_curves.py --run runs/ablation_nohires_teacher --data data/eval \
  --out docs/images/training_curves_nohires.png
