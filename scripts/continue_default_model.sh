#!/usr/bin/env bash
# Issue #18, session 10: the shipped teacher continued for 3,000 more steps on new samples of the same endless
# mixed stream (seed 1, a new cosine schedule at half the peak learning rate), then the rest of the shipped recipe
# (scripts/build_default_model.sh steps 2-4) into candidate run folders, and the held-out evaluation. Nothing in
# Resources/ is touched: the candidate ships only if it is measured better. Resumable: run it again.
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/memsam
test -f data/eval/dataset.json || $M data fetch --out data/eval
$M train --config memsam_hq_teacher --init training_state/hq_teacher_step4000.pt --data data/eval --steps 3000 \
  --lr 2e-4 --seed 1 --log-every 25 --checkpoint-every 100 --keep-every 1000 --procedural 0.4 --synthetic 0.2 \
  --out runs/hq_teacher_cont
test -f runs/cand_student/student.pt || $M distill --teacher runs/hq_teacher_cont/train_last.pt \
  --student-config memsam_hq_student --data data/eval --steps 600 --finetune-steps 400 --log-every 25 \
  --out runs/cand_student
test -f runs/cand_memory/model.pt || $M finetune-memory --model runs/cand_student/student.pt \
  --config memsam_hq_memory --data data/eval --steps 1500 --log-every 50 --checkpoint-every 100 \
  --memory-lr-scale 10 --procedural 0.2 --out runs/cand_memory
mkdir -p runs/cand
test -f runs/cand/memsam_hq_memory.pt || .venv/bin/python - <<'PY'
from MemorizingSAMLib.checkpoints import load_model, save_checkpoint
save_checkpoint(load_model("runs/cand_memory/model.pt"), "runs/cand/memsam_hq_memory.pt", half=True,
                metadata={"recipe": "scripts/build_default_model.sh + scripts/continue_default_model.sh"})
PY
test -f runs/cand/memsam_hq_memory.bank.msam || $M build-memory --model runs/cand/memsam_hq_memory.pt \
  --data data/eval --split train --sources pyradiomics,mricron --out runs/cand/memsam_hq_memory.bank.msam
# The teacher alone against the shipped one's (out/ablation/hq_teacher_*), then the candidate with / without bank.
for part in real:pyradiomics,mricron phantom:phantom; do
  $M evaluate --model runs/hq_teacher_cont/train_last.pt --data data/eval --clicks 10 --sources "${part#*:}" \
    --montage 0 --out "out/cand/teacher_${part%%:*}"
done
$M evaluate --model runs/cand/memsam_hq_memory.pt --memory runs/cand/memsam_hq_memory.bank.msam --data data/eval \
  --clicks 10 --out out/cand/memory
$M evaluate --model runs/cand/memsam_hq_memory.pt --data data/eval --clicks 10 --montage 0 --out out/cand/nobank
