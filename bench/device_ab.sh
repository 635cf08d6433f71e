#!/usr/bin/env bash
# Before/after A/B of our side on one device machine, one call (device tool: carry [".whl", "_before"]):
#
#   git archive <commit> engine kernels bench studio resources | tar -x -C _before   # the "before" tree
#   SHAPES="p2 p1" STEPS=20 bash bench/device_ab.sh
#
# For each shape: compare.py --sides engine from the working tree (with the variant
# ungrouped=--ungrouped-lora, i.e. training.disabled_transforms [lora_groups]), then the same from
# _before/ (its own bench scripts and engine), in that order, on one model cache. Results:
# $OUT/after/compare_<shape>.{json,md}, $OUT/before/compare_<shape>.{json,md}, device_ab.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ab_out}
STEPS=${STEPS:-20}
mkdir -p "$OUT/after" "$OUT/before"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
for side in after before; do
  tree=$PWD; [ $side = before ] && tree=$PWD/_before
  mkdir -p /tmp/cpt_$side/cpt_studio
  for pkg in engine studio kernels resources; do ln -sfn "$tree/$pkg" "/tmp/cpt_$side/cpt_studio/$pkg"; done
done
export PYTHONUNBUFFERED=1 CPT_BENCH_CACHE=/tmp/cpt_bench_models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for shape in ${SHAPES:-p2 p1}; do
  PYTHONPATH=/tmp/site:/tmp/cpt_after python3 bench/compare.py --shape "$shape" --sides engine \
      --steps "$STEPS" --warmup 3 --out "$OUT/after" --engine-variants ungrouped=--ungrouped-lora
  PYTHONPATH=/tmp/site:/tmp/cpt_before python3 _before/bench/compare.py --shape "$shape" --sides engine \
      --steps "$STEPS" --warmup 3 --out "$OUT/before"
done 2>&1 | tee "$OUT/device_ab.log"
