#!/usr/bin/env bash
# How the shipped default model was made, end to end (CPU, 2 cores). Each step resumes/skips if already done.
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/memsam
$M data fetch --out data/eval
$M train --config memsam_small_teacher --data data/eval --steps 2400 --log-every 25 --out runs/teacher
$M distill --teacher runs/teacher/train_last.pt --student-config memsam_tiny_student --data data/eval \
  --steps 600 --finetune-steps 300 --half --out runs/student
$M build-memory --model runs/student/student.pt --data data/eval --split train --sources pyradiomics,mricron \
  --out runs/student/bank.msam
mkdir -p Resources/models
cp runs/student/student.pt Resources/models/memsam_tiny_student.pt
cp runs/student/bank.msam Resources/models/memsam_tiny_student.bank.msam
$M evaluate --model Resources/models/memsam_tiny_student.pt --data data/eval --clicks 10 --baseline --out out/eval
$M evaluate --model Resources/models/memsam_tiny_student.pt --memory Resources/models/memsam_tiny_student.bank.msam \
  --data data/eval --clicks 10 --out out/eval_memory
