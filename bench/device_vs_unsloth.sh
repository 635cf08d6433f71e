#!/usr/bin/env bash
# Baseline vs Unsloth vs ours (issue 12), P2 then P1, in one device call, from the repo root:
#
#   bash bench/unsloth_wheels.sh                   # here, once: .whl_unsloth/ (~18 MB, slim bnb too)
#   device tool: carry [".whl_unsloth"], timeout_s 600, command:
#     bash bench/device_vs_unsloth.sh
#
# Installs .whl_unsloth's bitsandbytes (else .whl/'s: then carry ".whl" too) into $SITE for
# every side, and the Unsloth wheels into $SITE_UNSLOTH, which only the Unsloth side's process
# sees (compare.py's CPT_BENCH_UNSLOTH_SITE); cpt_studio through links, as bench/device_run.sh.
# Then per shape: compare.py --sides baseline,unsloth,engine, which also updates
# bench/results/vs_unsloth.json when all three ran. The device tool returns a few files: $OUT holds
# device_vs_unsloth.log, compare_<shape>.{json,md} and vs_unsloth.json (copy that one to
# bench/results/ here; compare.py wrote it). Env knobs: SHAPES ("p2 p1"), STEPS (20), WARMUP (3),
# KERNELS (auto), BUDGET_S (560: the whole call), EXTRA (more compare.py arguments), ENGINE_ARGS_P1,
# ENGINE_ARGS_P2 (our side's settings for that shape, e.g. "--unchecked-layers=8"), PYTHON
# (python3), SITE, SITE_UNSLOTH, CPTPATH (/tmp/site, /tmp/site_unsloth, /tmp/cptpath).
# CPU check of this script (Unsloth's CPU backend, no 4-bit; .whl_unsloth must then hold wheels
# for this machine's Python), e.g.:
#   SHAPES=tiny STEPS=6 WARMUP=2 EXTRA="--no-quant --vs-unsloth /tmp/o/vs_unsloth.json" OUT=/tmp/o \
#       PYTHON=.venv/bin/python SITE=/tmp/o/site SITE_UNSLOTH=/tmp/o/su CPTPATH=/tmp/o/cpt \
#       bash bench/device_vs_unsloth.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vs_unsloth_out}
BUDGET_S=${BUDGET_S:-560}
source bench/device_clock.sh
PY=${PYTHON:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac   # we cd /tmp below
SITE=${SITE:-/tmp/site}
SITE_UNSLOTH=${SITE_UNSLOTH:-/tmp/site_unsloth}
CPTPATH=${CPTPATH:-/tmp/cptpath}

main() {
say "installing carried wheels"
bnb=(.whl_unsloth/bitsandbytes-*.whl)
[ -f "${bnb[0]}" ] || bnb=(.whl/bitsandbytes-*.whl)
[ -f "${bnb[0]}" ] || { say "no bitsandbytes wheel in .whl_unsloth/ or .whl/"; return 1; }
others=()
for w in .whl_unsloth/*.whl; do case $w in */bitsandbytes-*) ;; *) others+=("$w") ;; esac; done
[ ${#others[@]} -gt 0 ] || { say "no Unsloth wheels: run bench/unsloth_wheels.sh and carry .whl_unsloth"; return 1; }
pipi() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pipi "$SITE" "${bnb[@]}" || { say "bitsandbytes install failed"; return 1; }
pipi "$SITE_UNSLOTH" "${others[@]}" || { say "Unsloth wheels install failed"; return 1; }
mkdir -p "$CPTPATH/cpt_studio"
for pkg in engine studio kernels resources; do ln -sfn "$PWD/$pkg" "$CPTPATH/cpt_studio/$pkg"; done
export PYTHONPATH="$SITE:$CPTPATH${PYTHONPATH:+:$PYTHONPATH}"
export CPT_BENCH_UNSLOTH_SITE=$SITE_UNSLOTH
touch "$CPTPATH/.start"   # vs_unsloth.json goes back only if this call wrote it
export PYTHONUNBUFFERED=1 CPT_BENCH_CACHE=/tmp/cpt_bench_models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || say "no nvidia-smi"
# From /tmp (the repo root's kernels/ would shadow the hub package); Unsloth first, as its side does.
(cd /tmp && PYTHONPATH="$SITE_UNSLOTH:$PYTHONPATH" HF_HUB_OFFLINE=1 "$PY" -c "
import unsloth, unsloth_zoo, torch, transformers, peft, trl, bitsandbytes
print('unsloth', unsloth.__version__, '| unsloth_zoo', unsloth_zoo.__version__, '| trl', trl.__version__,
      '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__,
      '| bitsandbytes', bitsandbytes.__version__, '| cpu backend', getattr(unsloth, '_IS_CPU_BACKEND', None))") \
    || say "WARNING: unsloth does not import (its side will say failed)"

# Our side's settings beyond the defaults, per shape (recorded in vs_unsloth.json as ours_args).
engine_args() { case $1 in p1) echo "${ENGINE_ARGS_P1:-}" ;; p2) echo "${ENGINE_ARGS_P2:-}" ;; *) echo "" ;; esac; }
shapes=(${SHAPES:-p2 p1})
last=${shapes[${#shapes[@]}-1]}
for shape in "${shapes[@]}"; do
    # All but the last shape get at most 240 s, so that P1 (the 8B build, three 4-bit loads and
    # Unsloth's compiles) keeps the rest.
    budget=$(left); [ "$shape" != "$last" ] && [ "$budget" -gt 240 ] && budget=240
    say "$shape (budget ${budget}s)"
    # shellcheck disable=SC2086
    "$PY" bench/compare.py --shape "$shape" --sides baseline,unsloth,engine --steps "${STEPS:-20}" \
        --warmup "${WARMUP:-3}" --kernels "${KERNELS:-auto}" --out "$OUT" --budget-s "$budget" \
        "--engine-args=$(engine_args "$shape")" ${EXTRA:-}
done
if [ bench/results/vs_unsloth.json -nt "$CPTPATH/.start" ]; then
    cp bench/results/vs_unsloth.json "$OUT/" && say "bench/results/vs_unsloth.json updated (in \$OUT)"
fi
say "tables"
for shape in "${shapes[@]}"; do cat "$OUT/compare_$shape.md" 2>/dev/null; echo; done
say "done"
}
main "$@" 2>&1 | tee -a "$OUT/device_vs_unsloth.log"
