#!/usr/bin/env bash
# Issue #18, session 17: the shipped recipe (scripts/build_default_model.sh, steps 2-5) rebuilt from the teacher
# continued on the corrected phantom labels (training_state/hq_teacher_fixed.pt, scripts/teacher_corrected_labels.sh)
# into runs/fx_*, then the held-out evaluation paired against the session-15 model. Nothing in Resources/ is
# touched. Its result (sessions 17-18) ships as Resources/models/memsam_hq_geo.pt (docs/training.md). Every step
# resumes or skips what is done: run it again.
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/memsam
test -f data/eval/dataset.json || $M data fetch --out data/eval
# The memory-tuned student of session 17 is kept in training_state/ (fp16): a new machine starts from it.
MEM=runs/fx_memory/model.pt
if [ ! -f "$MEM" ] && [ -f training_state/fx_memory.pt ]; then MEM=training_state/fx_memory.pt; fi
test -f "$MEM" || test -f runs/fx_student/student.pt || $M distill --teacher training_state/hq_teacher_fixed.pt \
  --student-config memsam_hq_student --data data/eval --steps 600 --finetune-steps 400 --log-every 25 \
  --out runs/fx_student
test -f "$MEM" || $M finetune-memory --model runs/fx_student/student.pt --config memsam_hq_memory \
  --data data/eval --steps 1500 --log-every 50 --checkpoint-every 100 --memory-lr-scale 10 --procedural 0.2 \
  --out runs/fx_memory
test -f runs/fx_clickmaps/model.pt || $M finetune-memory --model "$MEM" --config memsam_hq_clicks \
  --data data/eval --steps 2000 --lr 1e-4 --memory-lr-scale 1 --procedural 0.2 --max-clicks 10 --log-every 50 \
  --checkpoint-every 100 --half --out runs/fx_clickmaps
test -f runs/fx_geo/model.pt || $M finetune-memory --model runs/fx_clickmaps/model.pt --config memsam_hq_geo \
  --data data/eval --steps 2000 --lr 1e-4 --memory-lr-scale 1 --procedural 0.3 --synthetic 0.2 --seed 1 \
  --max-clicks 10 --log-every 50 --checkpoint-every 100 --half --out runs/fx_geo
test -f runs/fx_geo/bank.msam || $M build-memory --model runs/fx_geo/model.pt --data data/eval --split train \
  --sources pyradiomics,mricron --out runs/fx_geo/bank.msam
$M evaluate --model runs/fx_geo/model.pt --memory runs/fx_geo/bank.msam --data data/eval --clicks 10 --montage 0 \
  --out out/fx_geo
# The model it replaced (session 15, shipped until session 17; kept in training_state/) through the same harness.
S15=training_state/memsam_hq_geo_session15.pt
test -f runs/s15/bank.msam || $M build-memory --model $S15 --data data/eval --split train \
  --sources pyradiomics,mricron --out runs/s15/bank.msam
test -f out/fx_shipped/eval_memsam_hq_geo_memory.json || $M evaluate --model $S15 --memory runs/s15/bank.msam \
  --data data/eval --clicks 10 --montage 0 --out out/fx_shipped
.venv/bin/python scripts/compare_evaluations.py out/fx_shipped/eval_memsam_hq_geo_memory.json \
  out/fx_geo/eval_memsam_hq_geo_memory.json | tee runs/fx_compare.txt
