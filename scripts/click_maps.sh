#!/usr/bin/env bash
# Issue #18, session 14: click maps in the mask head (MemorizingSAMLib/modeling/click_maps.py). The session-8 model
# (training_state/memsam_hq_memory_session8.pt) converted to memsam_hq_clicks (the head starts at zero: the old
# logits until trained), memory fine-tuned with up to 10 clicks per sample, its own bank, the held-out evaluation,
# and the paired comparison with the session-8 model evaluated the same way. Its result ships as
# Resources/models/memsam_hq_clicks.pt (scripts/build_default_model.sh, step 4, is the same run); nothing in
# Resources/ is touched here. Resumable within a session (run it again; Ctrl-C is safe).
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/memsam
test -f data/eval/dataset.json || $M data fetch --out data/eval
test -f runs/hq_clickmaps/model.pt || $M finetune-memory --model training_state/memsam_hq_memory_session8.pt \
  --config memsam_hq_clicks --data data/eval --steps 2000 --lr 1e-4 --memory-lr-scale 1 --procedural 0.2 \
  --max-clicks 10 --log-every 50 --checkpoint-every 100 --half --out runs/hq_clickmaps
mkdir -p runs/clickmaps && cp -n runs/hq_clickmaps/model.pt runs/clickmaps/memsam_hq_clicks.pt
test -f runs/clickmaps/memsam_hq_clicks.bank.msam || $M build-memory --model runs/clickmaps/memsam_hq_clicks.pt \
  --data data/eval --split train --sources pyradiomics,mricron --out runs/clickmaps/memsam_hq_clicks.bank.msam
# The session-8 model (shipped until this run) with its bank, rebuilt the way it shipped.
B8=runs/clickmaps/memsam_hq_memory_session8.bank.msam
test -f $B8 || $M build-memory --model training_state/memsam_hq_memory_session8.pt --data data/eval --split train \
  --sources pyradiomics,mricron --out $B8
test -f out/ship/eval_memsam_hq_memory_memory.json || $M evaluate --model training_state/memsam_hq_memory_session8.pt \
  --memory $B8 --data data/eval --clicks 10 --montage 0 --out out/ship
$M evaluate --model runs/clickmaps/memsam_hq_clicks.pt --memory runs/clickmaps/memsam_hq_clicks.bank.msam \
  --data data/eval --clicks 10 --montage 0 --out out/clickmaps
.venv/bin/python scripts/compare_evaluations.py out/ship/eval_memsam_hq_memory_memory.json \
  out/clickmaps/eval_memsam_hq_clicks_memory.json
