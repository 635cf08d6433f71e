#!/usr/bin/env bash
# One device call of the P1/P2 benchmark (GOALS.md "Speed and memory"), run from the repo root:
#
#   bash bench/device_run.sh            # compare P2 then P1 (baseline vs ours), ~7 min
#   bash bench/device_run.sh probe      # longest sequence at batch 1, P1 workload, both sides
#                                       # (lengths: BASE_SEQS, OURS_SEQS; allocator capped at 78 GiB)
#   bash bench/device_run.sh profile    # torch.profiler of P1 steps (PROFILE_SIDES, PROFILE_SHAPE):
#                                       # profile_p1.{json,md}, trace_p1_<side>.json.gz
#   bash bench/device_run.sh pyspy      # where the host's time goes: py-spy samples of our side on
#                                       # PROFILE_SHAPE (p2), pyspy_<shape>.txt.gz (folded stacks of
#                                       # Python frames; read with bench/host_profile.py). Needs the
#                                       # py-spy wheel in .whl/ (pip download --no-deps py-spy).
#
# Device tool: carry [".whl"] (the bitsandbytes 0.50.2 wheel; the image has none). Results land in
# $OUT: compare_p2.{json,md}, compare_p1.{json,md} (or probe_p1.{json,md}) and device_run.log.
# Env knobs: STEPS (12), WARMUP (3), KERNELS (auto), BUDGET_S (530 = the whole call's seconds),
# SHAPES ("p2 p1"), EXTRA (more compare.py arguments, split on spaces: write an engine variant as
# one word, --engine-variants flash=--sdpa-backend=flash). CPU check of this script, from a copy of
# the tree: SHAPES=tiny EXTRA=--no-quant OUT=/tmp/o bash bench/device_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_out}
BUDGET_S=${BUDGET_S:-530}
source bench/device_clock.sh

main() {
say "installing carried wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { say "wheel install failed"; return 1; }
# cpt_studio's import root, as pyproject's package-dir maps it: cpt_studio.<x> = ./<x>. Links in a
# folder of their own, so the repo root (whose top-level kernels/ transformers would import as the
# hub 'kernels' package) never lands on sys.path.
mkdir -p /tmp/cptpath/cpt_studio
for pkg in engine studio kernels resources; do ln -sfn "$PWD/$pkg" "/tmp/cptpath/cpt_studio/$pkg"; done
export PYTHONPATH="/tmp/site:/tmp/cptpath${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 CPT_BENCH_CACHE=/tmp/cpt_bench_models
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv,noheader \
    || say "no nvidia-smi (CPU check)"
# From /tmp: with the repo root as cwd, python -c would see ./kernels as a top-level package.
(cd /tmp && python3 -c "import torch, transformers, peft, bitsandbytes, triton, cpt_studio.engine.train.setup
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
      '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__, bitsandbytes.__file__,
      '| triton', triton.__version__, '| cpt_studio', cpt_studio.engine.__path__[0])
try:
    import cpt_studio.engine.speed.patching
except ImportError as exc:
    print('WARNING: engine kernels cannot load (KERNELS=auto will fail on CUDA):', exc)") \
    || { say "imports failed"; return 1; }

STEPS=${STEPS:-12} WARMUP=${WARMUP:-3} KERNELS=${KERNELS:-auto}
if [ "${1:-compare}" = probe ]; then
    # Each side from its own start; a side whose first length runs out of memory halves down.
    base_seqs=${BASE_SEQS:-4096 8192 16384}
    ours_seqs=${OURS_SEQS:-16384 32768 65536 131072}
    say "probe ${PROBE_SHAPE:-p1}: baseline [$base_seqs], ours [$ours_seqs]"
    python3 bench/compare.py --shape "${PROBE_SHAPE:-p1}" --probe-seq --seqs $base_seqs \
        --engine-seqs $ours_seqs --kernels "$KERNELS" --out "$OUT" --budget-s "$(left)" ${EXTRA:-}
elif [ "${1:-compare}" = profile ]; then
    # Where the step time goes (torch.profiler): bench/profile_step.py, ours then the baseline.
    say "profile ${PROFILE_SHAPE:-p1}: sides [${PROFILE_SIDES:-engine baseline}]"
    python3 bench/profile_step.py --shape "${PROFILE_SHAPE:-p1}" --sides ${PROFILE_SIDES:-engine baseline} \
        --kernels "$KERNELS" --keep-trace --out "$OUT" --budget-s "$(left)" ${EXTRA:-}
elif [ "${1:-compare}" = pyspy ]; then
    shape=${PROFILE_SHAPE:-p2}
    say "py-spy of our side on $shape, $STEPS steps"
    model="$CPT_BENCH_CACHE/$shape"
    [ -f "$model/config.json" ] || python3 bench/build_model.py --shape "$shape" --out "$model"
    # Python frames only: with --native, py-spy fell minutes behind at 400 Hz on a 2-core CPU.
    timeout "$(left)" /tmp/site/bin/py-spy record --idle --rate 250 --format raw -o "$OUT/pyspy_$shape.txt" -- \
        python3 bench/engine_train.py --model "$model" --shape "$shape" --steps "$STEPS" \
        --warmup "$WARMUP" --kernels "$KERNELS" ${EXTRA:-}
    gzip -9f "$OUT/pyspy_$shape.txt"   # the folded text of a P2 run passed the tool's 16 MiB a file
else
    shapes=(${SHAPES:-p2 p1})
    last=${shapes[${#shapes[@]}-1]}
    for shape in "${shapes[@]}"; do
        # All but the last shape get at most 210 s, so that P1 (the 8B build and two 4-bit loads)
        # keeps the rest of the budget.
        budget=$(left); [ "$shape" != "$last" ] && [ "$budget" -gt 210 ] && budget=210
        say "$shape (budget ${budget}s)"
        python3 bench/compare.py --shape "$shape" --steps "$STEPS" --warmup "$WARMUP" \
            --kernels "$KERNELS" --out "$OUT" --budget-s "$budget" ${EXTRA:-}
    done
    say "tables"
    for shape in "${shapes[@]}"; do cat "$OUT/compare_$shape.md" 2>/dev/null; echo; done
fi
say "done"
}
main "$@" 2>&1 | tee -a "$OUT/device_run.log"
