#!/usr/bin/env bash
# Issue #18, session 12: the teacher continued (from the session-10 continuation) with click 1 off the crop centre
# for half of the samples (--click-offset 12: up to 18 mm per axis), so that it learns to segment the structure
# under a click anywhere in the crop, then the rest of the shipped recipe into candidate folders and the held-out
# evaluation. Same steps, learning rate and recipe as scripts/continue_default_model.sh (its candidate is the
# comparison; only the seed and the click offset differ). Nothing in Resources/ is touched: the candidate ships only
# if it is measured better. Resumable within a session (run it again; Ctrl-C is safe); the teacher's final fp16
# weights go to training_state/ (7 MB; the optimiser state, 43 MB, is not kept).
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/memsam
RUN=runs/hq_teacher_click
test -f data/eval/dataset.json || $M data fetch --out data/eval
$M train --config memsam_hq_teacher --init training_state/hq_teacher_cont_step3000.pt --data data/eval \
  --steps 3000 --lr 2e-4 --seed 2 --click-offset 12 --log-every 25 --checkpoint-every 100 --keep-every 1000 \
  --procedural 0.4 --synthetic 0.2 --out "$RUN"
test -f training_state/hq_teacher_click_step3000.pt || .venv/bin/python - <<'PY'
from MemorizingSAMLib.checkpoints import load_model, save_checkpoint
save_checkpoint(load_model("runs/hq_teacher_click/train_last.pt"), "training_state/hq_teacher_click_step3000.pt",
                half=True, metadata={"recipe": "scripts/teacher_click_offset.sh"})
PY
test -f runs/click_student/student.pt || $M distill --teacher "$RUN"/train_last.pt \
  --student-config memsam_hq_student --data data/eval --steps 600 --finetune-steps 400 --click-offset 12 \
  --log-every 25 --out runs/click_student
test -f runs/click_memory/model.pt || $M finetune-memory --model runs/click_student/student.pt \
  --config memsam_hq_memory --data data/eval --steps 1500 --log-every 50 --checkpoint-every 100 \
  --memory-lr-scale 10 --procedural 0.2 --click-offset 12 --half --out runs/click_memory
# The fp16 weights as they would ship, and their bank (banks record a fingerprint of the weights).
mkdir -p runs/click && cp -n runs/click_memory/model.pt runs/click/memsam_hq_memory.pt
test -f runs/click/memsam_hq_memory.bank.msam || $M build-memory --model runs/click/memsam_hq_memory.pt \
  --data data/eval --split train --sources pyradiomics,mricron --out runs/click/memsam_hq_memory.bank.msam
$M evaluate --model runs/click/memsam_hq_memory.pt --memory runs/click/memsam_hq_memory.bank.msam --data data/eval \
  --clicks 10 --out out/click/memory
$M evaluate --model runs/click/memsam_hq_memory.pt --data data/eval --clicks 10 --montage 0 --out out/click/nobank
