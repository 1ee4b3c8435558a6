#!/usr/bin/env bash
# How the shipped default model was made, end to end (CPU, 2 cores). Each step resumes/skips if already done.
# The two memory fine-tuning runs were made while the memory config grew: run 1 (runs/memory3) had no prior route
# yet (it was added before run 2, starting at u = 0); with today's code run 1 trains it too, so a rebuild gives a
# comparable, not bit-identical, model.
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/memsam
$M data fetch --out data/eval
$M train --config memsam_small_teacher --data data/eval --steps 2400 --log-every 25 --out runs/teacher
$M distill --teacher runs/teacher/train_last.pt --student-config memsam_tiny_student --data data/eval \
  --steps 600 --finetune-steps 300 --half --out runs/student
$M finetune-memory --model runs/student/student.pt --data data/eval --steps 3000 --log-every 50 \
  --checkpoint-every 250 --out runs/memory3
$M finetune-memory --model runs/memory3/model.pt --data data/eval --steps 3000 --memory-lr-scale 10 \
  --log-every 100 --checkpoint-every 500 --out runs/memory5
mkdir -p Resources/models
.venv/bin/python - <<'PY'
from MemorizingSAMLib.checkpoints import load_model, save_checkpoint
save_checkpoint(load_model("runs/memory5/model.pt"), "Resources/models/memsam_tiny_memory.pt", half=True,
                metadata={"recipe": "scripts/build_default_model.sh"})
PY
# The bank is built from the fp16 weights that ship (banks record a fingerprint of the weights).
$M build-memory --model Resources/models/memsam_tiny_memory.pt --data data/eval --split train \
  --sources pyradiomics,mricron --out Resources/models/memsam_tiny_memory.bank.msam
$M evaluate --model Resources/models/memsam_tiny_memory.pt --data data/eval --clicks 10 --baseline --out out/eval
$M evaluate --model Resources/models/memsam_tiny_memory.pt --memory Resources/models/memsam_tiny_memory.bank.msam \
  --data data/eval --clicks 10 --out out/eval_memory
