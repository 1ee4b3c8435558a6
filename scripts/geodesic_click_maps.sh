#!/usr/bin/env bash
# Issue #18, session 15: geodesic click maps (modeling/click_maps.py, geodesic.py; config memsam_hq_geo) on the
# corrected phantom labels. Two fine-tunes of memsam_hq_clicks (shipped in session 14, now training_state/memsam_hq_clicks_session14.pt) with the same recipe and seed, so that
# each change is measured alone:
#   runs/fixed: memsam_hq_clicks continued on the corrected data (session 14's continuation,
#               training_state/hq_clicks_cont_step2000.pt, had the same recipe on the shifted phantom labels);
#   runs/geo:   converted to memsam_hq_geo (the geodesic columns start at zero), same recipe.
# Each gets its own bank and the held-out evaluation; the paired comparisons follow. Resumable (run it again).
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/memsam
S14=training_state/memsam_hq_clicks_session14.pt
RECIPE="--data data/eval --steps ${STEPS:-2000} --lr 1e-4 --memory-lr-scale 1 --procedural 0.3 --synthetic 0.2 --seed 1
  --max-clicks 10 --log-every 50 --checkpoint-every 100 --half"
test -f data/eval/dataset.json || $M data fetch --out data/eval
for run in fixed:memsam_hq_clicks geo:memsam_hq_geo; do
  name=${run%%:*}; cfg=${run##*:}
  test -f runs/$name/model.pt || $M finetune-memory --model $S14 --config $cfg \
    $RECIPE --out runs/$name
  test -f runs/$name/bank.msam || $M build-memory --model runs/$name/model.pt --data data/eval --split train \
    --sources pyradiomics,mricron --out runs/$name/bank.msam
  test -f out/$name/eval_${cfg}_memory.json || $M evaluate --model runs/$name/model.pt \
    --memory runs/$name/bank.msam --data data/eval --clicks 10 --montage 0 --out out/$name
done
B14=runs/clickmaps/memsam_hq_clicks_session14.bank.msam
test -f $B14 || $M build-memory --model $S14 --data data/eval --split train --sources pyradiomics,mricron --out $B14
test -f out/clickmaps/eval_memsam_hq_clicks_memory.json || $M evaluate --model $S14 --memory $B14 --data data/eval --clicks 10 --montage 0 --out out/clickmaps
P=".venv/bin/python scripts/compare_evaluations.py"
echo "== shipped -> fixed data"; $P out/clickmaps/eval_memsam_hq_clicks_memory.json out/fixed/eval_memsam_hq_clicks_memory.json
echo "== fixed data -> geodesic"; $P out/fixed/eval_memsam_hq_clicks_memory.json out/geo/eval_memsam_hq_geo_memory.json
# What ships (session 15): runs/geo/model.pt as Resources/models/memsam_hq_geo.pt with its bank (same bytes as
# runs/geo/bank.msam), see scripts/build_default_model.sh step 4b.
