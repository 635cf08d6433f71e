#!/usr/bin/env bash
# Before/after A/B of our side on one device machine, one call (device tool: carry [".whl", "_before"]):
#
#   git archive <commit> engine kernels bench studio resources | tar -x -C _before   # the "before" tree
#   SHAPES="p2 p1" STEPS=20 REPEATS=2 bash bench/device_ab.sh
#
# For each repeat and shape: compare.py --sides engine from the working tree (UNGROUPED=1 adds the
# variant ungrouped=--ungrouped-lora, i.e. training.disabled_transforms [lora_groups]) and the same
# from _before/ (its own bench scripts and engine), on one model cache. Odd repeats run after first,
# even ones before first, so that a slow stretch of the machine does not land on one side only. Results: one
# archive $OUT/ab.tgz (r<N>/{after,before}/compare_<shape>*.{json,md}; the device tool returns only
# a few files) and the log $OUT/device_ab.log. AFTER_TREE=<folder> measures a snapshot there (made
# like _before) instead of the working tree, so that edits in progress do not reach the device run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ab_out}
STEPS=${STEPS:-20}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
for side in after before; do
  tree=$PWD/${AFTER_TREE:-.}; [ $side = before ] && tree=$PWD/_before
  mkdir -p /tmp/cpt_$side/cpt_studio
  for pkg in engine studio kernels resources; do ln -sfn "$tree/$pkg" "/tmp/cpt_$side/cpt_studio/$pkg"; done
done
export PYTHONUNBUFFERED=1 CPT_BENCH_CACHE=/tmp/cpt_bench_models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for r in $(seq 1 "${REPEATS:-1}"); do
  for shape in ${SHAPES:-p2 p1}; do
    echo "== repeat $r, $shape"
    order="after before"; [ $((r % 2)) = 0 ] && order="before after"
    for side in $order; do
      if [ $side = after ]; then
        PYTHONPATH=/tmp/site:/tmp/cpt_after python3 ${AFTER_TREE:-.}/bench/compare.py --shape "$shape" --sides engine \
            --steps "$STEPS" --warmup 3 --out "$OUT/r$r/after" \
            ${UNGROUPED:+--engine-variants ungrouped=--ungrouped-lora}
      else
        PYTHONPATH=/tmp/site:/tmp/cpt_before python3 _before/bench/compare.py --shape "$shape" --sides engine \
            --steps "$STEPS" --warmup 3 --out "$OUT/r$r/before"
      fi
    done
  done
done 2>&1 | tee "$OUT/device_ab.log"
tar -czf "$OUT/ab.tgz" -C "$OUT" $(cd "$OUT" && ls -d r*) && rm -rf "$OUT"/r*
