#!/usr/bin/env bash
# How the shipped default model is made, end to end (2 CPU cores here; on GPUs prefix the training commands with
# `torchrun --standalone --nproc_per_node N -m MemorizingSAMLib.cli` instead of `memsam`, see docs/training.md).
# Every step resumes where it stopped (run it again after an interruption) and skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/memsam
MIX="--procedural 0.4 --synthetic 0.2"   # training/mixed.py: procedural volumes, painted label maps, real images
test -f data/eval/dataset.json || $M data fetch --out data/eval
# 1. Teacher with the high-resolution mask-head features, on the endless mixed stream: 4,000 steps from scratch,
#    3,000 more on new samples (seed 1, a new schedule at half the peak rate;
#    training_state/hq_teacher_cont_step3000.pt), 2,500 more (seed 3; training_state/hq_teacher_fixed.pt). The
#    shipped teacher's first 7,000 steps ran before session 15 put the phantoms' labels back on their images; run
#    today, every step trains on the corrected ones.
$M train --config memsam_hq_teacher --data data/eval --steps 4000 --log-every 25 --checkpoint-every 100 \
  --keep-every 1000 $MIX --out runs/hq_teacher
$M train --config memsam_hq_teacher --init runs/hq_teacher/train_last.pt --data data/eval --steps 3000 \
  --lr 2e-4 --seed 1 --log-every 25 --checkpoint-every 100 --keep-every 1000 $MIX --out runs/hq_teacher_cont
$M train --config memsam_hq_teacher --init runs/hq_teacher_cont/train_last.pt --data data/eval --steps 2500 \
  --lr 2e-4 --seed 3 --log-every 25 --checkpoint-every 100 --keep-every 500 $MIX --out runs/hq_teacher_fixed
# 2. FastSAM3D-style student: layer-wise progressive distillation, then decoder fine-tuning, on the real training
#    images (the generated cases cost more to make than a distillation step; 6 min here instead of ~35).
test -f runs/hq_student/student.pt || $M distill --teacher runs/hq_teacher_fixed/train_last.pt \
  --student-config memsam_hq_student --data data/eval --steps 600 --finetune-steps 400 --log-every 25 \
  --out runs/hq_student
# 3. Memory fine-tuning (memory attention active for half of the samples; bank-making weights frozen).
test -f runs/hq_memory/model.pt || $M finetune-memory --model runs/hq_student/student.pt --config memsam_hq_memory \
  --data data/eval --steps 1500 --log-every 50 --checkpoint-every 100 --memory-lr-scale 10 --procedural 0.2 \
  --out runs/hq_memory
# The fp16 weights (what shipped in session 8 and is kept as training_state/memsam_hq_memory_session8.pt).
test -f runs/hq_memory/memsam_hq_memory.pt || .venv/bin/python - <<'PY'
from MemorizingSAMLib.checkpoints import load_model, save_checkpoint
save_checkpoint(load_model("runs/hq_memory/model.pt"), "runs/hq_memory/memsam_hq_memory.pt", half=True,
                metadata={"recipe": "scripts/build_default_model.sh"})
PY
# 4. Click maps in the mask head (modeling/click_maps.py, session 14): converted to memsam_hq_clicks (the head
#    starts at zero) and memory fine-tuned again with up to 10 clicks per sample, the head at 10x the learning rate.
test -f runs/hq_clickmaps/model.pt || $M finetune-memory --model runs/hq_memory/memsam_hq_memory.pt \
  --config memsam_hq_clicks --data data/eval --steps 2000 --lr 1e-4 --memory-lr-scale 1 --procedural 0.2 \
  --max-clicks 10 --log-every 50 --checkpoint-every 100 --half --out runs/hq_clickmaps
# 4b. Geodesic click maps (session 15): converted to memsam_hq_geo (4 zero columns) and fine-tuned again (seed 1).
#     Steps 2-4b of the shipped weights ran in sessions 17-18 (scripts/rebuild_on_corrected_labels.sh, from
#     training_state/fx_memory.pt, the fp16 step-3 output).
test -f runs/geo/model.pt || $M finetune-memory --model runs/hq_clickmaps/model.pt --config memsam_hq_geo \
  --data data/eval --steps 2000 --lr 1e-4 --memory-lr-scale 1 --procedural 0.3 --synthetic 0.2 --seed 1 \
  --max-clicks 10 --log-every 50 --checkpoint-every 100 --half --out runs/geo
mkdir -p Resources/models
cp runs/geo/model.pt Resources/models/memsam_hq_geo.pt
# 5. The bank, from the fp16 weights that ship (banks record a fingerprint of the weights).
$M build-memory --model Resources/models/memsam_hq_geo.pt --data data/eval --split train \
  --sources pyradiomics,mricron --out Resources/models/memsam_hq_geo.bank.msam
# 6. Held-out evaluation with and without the bank, baselines, curves.
$M evaluate --model Resources/models/memsam_hq_geo.pt --memory Resources/models/memsam_hq_geo.bank.msam \
  --data data/eval --clicks 10 --baseline --out out/eval_memory
$M evaluate --model Resources/models/memsam_hq_geo.pt --data data/eval --clicks 10 --out out/eval
.venv/bin/python scripts/training_curves.py --run runs/hq_teacher --data data/eval --out docs/images/training_curves.png
