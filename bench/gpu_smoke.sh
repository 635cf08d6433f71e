#!/usr/bin/env bash
# One device call: the GPU test suite, then a real CLI training run on the GPU (train, runs, export).
#
#   bash bench/gpu_smoke.sh          # device tool: carry [".whl"] (bitsandbytes 0.50.2 wheel)
#
# 1. pytest -m gpu tests/kernels tests/engine                          -> $OUT/gpu_suite.log
# 2. cpt-studio train on a tiny random llama (tests/tiny_models.py), 4-bit base, kernels auto,
#    30 steps, seq_len 64, the sample Esperanto corpus                   -> $OUT/train_events.jsonl
#    then `runs` and `export RUN --dtype bf16`                           -> $OUT/runs_export.log
#    and a check of the events                                           -> $OUT/train_summary.json
# The whole log: $OUT/gpu_smoke.log. Budgets (seconds): TRAIN_S (150) for the train/export part,
# SUITE_S (190) for pytest (stopped with SIGINT, so pytest still prints its summary line).
# The train run goes first: it is the shorter, fixed-cost part; the suite gets what is left.
# CPU check of this script (no wheel install, the GPU tests deselect/skip themselves):
#   NO_WHEELS=1 PY=.venv/bin/python OUT=/tmp/o bash bench/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/gpu_smoke_out}
PY=${PY:-python3}
mkdir -p "$OUT"
START=$(date +%s)
say() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

main() {
if [ -z "${NO_WHEELS:-}" ]; then
    say "installing carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { say "wheel install failed"; return 1; }
fi
# cpt_studio's import root as pyproject's package-dir maps it, through links in a folder of its
# own: the repo root (its top-level kernels/) never lands on sys.path (python -P, cwd /tmp).
mkdir -p /tmp/cptpath/cpt_studio
for pkg in engine studio kernels resources; do ln -sfn "$REPO/$pkg" "/tmp/cptpath/cpt_studio/$pkg"; done
export PYTHONPATH="/tmp/site:/tmp/cptpath${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || say "no nvidia-smi"
(cd /tmp && $PY -P -c "import sys, torch, transformers, peft, bitsandbytes, triton, pytest, cpt_studio.engine
print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA',
      '| transformers', transformers.__version__, '| peft', peft.__version__,
      '| bitsandbytes', bitsandbytes.__version__, '| triton', triton.__version__,
      '| pytest', pytest.__version__, '| cpt_studio', cpt_studio.engine.__path__[0])") \
    || { say "imports failed"; return 1; }

# ---- 2. the CLI training run --------------------------------------------------------------------
say "tiny model -> /tmp/tiny"
(cd /tmp && PYTHONPATH="$REPO/tests:$PYTHONPATH" $PY -P -c "
from tiny_models import build_tiny_model, build_tiny_tokenizer
m = build_tiny_model('llama', vocab_size=384); m.save_pretrained('/tmp/tiny')
build_tiny_tokenizer().save_pretrained('/tmp/tiny')
print('tiny llama:', sum(p.numel() for p in m.parameters()), 'params')") || { say "tiny model failed"; return 1; }
cat > /tmp/gpu_smoke.yaml <<EOF
name: gpu-smoke
model: {source: /tmp/tiny, precision: ${PRECISION:-4bit}}
adapter: {r: 8, alpha: 16}
data: {train_files: ["$REPO/resources/sample_corpus/esperanto"], seq_len: 64, eval_fraction: 0.1}
training: {max_steps: ${STEPS:-30}, batch_size: 8, learning_rate: 0.01, warmup_steps: 3, kernels: auto}
eval: {every_steps: 10}
checkpoint: {every_steps: 10}
EOF
rm -rf /tmp/ws
CLI="$PY -P -m cpt_studio.engine.cli"
say "train"
(cd /tmp && timeout ${TRAIN_S:-150} $CLI train /tmp/gpu_smoke.yaml --workspace /tmp/ws --events jsonl \
    < /dev/null > "$OUT/train_events.jsonl"); say "train rc=$?"
RUN=$($PY -c "import json,sys
for l in open(sys.argv[1]):
    d = json.loads(l)
    if d.get('type') == 'RunStarted': print(d['run_id']); break" "$OUT/train_events.jsonl")
say "run id: ${RUN:-none}"
{ (cd /tmp && $CLI runs --workspace /tmp/ws); echo "runs rc=$?"
  [ -n "$RUN" ] && (cd /tmp && timeout 60 $CLI export "$RUN" --dtype bf16 --workspace /tmp/ws 2>&1)
  echo "export rc=$?"; } 2>&1 | tee "$OUT/runs_export.log"
$PY - "$OUT/train_events.jsonl" "$OUT/runs_export.log" > "$OUT/train_summary.json" <<'EOF'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
by = lambda t: [e for e in ev if e["type"] == t]
rs = (by("RunStarted") or [{}])[0]
steps = by("StepMetrics")
evals = [e for e in by("EvalMetrics") if e["eval_set"] == "heldout"]
tps = [s["tokens_per_s"] for s in steps[1:]] or [0]
out = {
    "run_id": rs.get("run_id"), "device": rs.get("device"), "kernels": rs.get("kernels"),
    "trainable_params": rs.get("trainable_params"), "total_params": rs.get("total_params"),
    "steps": len(steps), "first_loss": steps[0]["loss"] if steps else None,
    "last_loss": steps[-1]["loss"] if steps else None,
    "mean_loss_first5": sum(s["loss"] for s in steps[:5]) / max(1, len(steps[:5])),
    "mean_loss_last5": sum(s["loss"] for s in steps[-5:]) / max(1, len(steps[-5:])),
    "heldout": [(e["step"], round(e["eval_loss"], 4)) for e in evals],
    "gpu_mem_fields_filled": bool(steps) and all(s["gpu_mem_allocated"] is not None and
                                                  s["gpu_mem_reserved"] is not None and
                                                  s["gpu_mem_total"] is not None for s in steps),
    "peak_gpu_mem_allocated_MiB": max((s["gpu_mem_allocated"] or 0) for s in steps) / 2**20 if steps else None,
    "peak_gpu_mem_reserved_MiB": max((s["gpu_mem_reserved"] or 0) for s in steps) / 2**20 if steps else None,
    "gpu_mem_total_MiB": (steps[-1]["gpu_mem_total"] or 0) / 2**20 if steps else None,
    "tokens_per_s_median": sorted(tps)[len(tps) // 2], "tokens_per_s_last": tps[-1],
    "step_s_median": sorted(s["step_s"] for s in steps)[len(steps) // 2] if steps else None,
    "run_finished": by("RunFinished"), "run_failed": by("RunFailed"),
    "warnings": [e["message"] for e in by("Log") if e["level"] in ("warning", "error")],
    "export": [l.strip() for l in open(sys.argv[2]) if "Merged model" in l or "parameters" in l or "rc=" in l],
}
out["checks"] = {"kernels_on": out["kernels"] is True, "device_h200": "H200" in str(out["device"]),
                 "loss_falls": bool(steps) and out["mean_loss_last5"] < out["mean_loss_first5"],
                 "gpu_mem_filled": out["gpu_mem_fields_filled"], "finished": bool(out["run_finished"])}
print(json.dumps(out, indent=1))
EOF
cat "$OUT/train_summary.json"

# ---- 1. the GPU test suite ----------------------------------------------------------------------
# From the repo root (pytest's rootdir: pyproject.toml's config, tests/conftest.py puts tests/ on
# sys.path); -P keeps the root itself off sys.path. -m gpu overrides addopts' -m 'not gpu'.
say "pytest -m gpu (budget ${SUITE_S:-190}s)"
timeout -s INT -k 15 ${SUITE_S:-190} $PY -P -m pytest -m gpu tests/kernels tests/engine -q -p no:cacheprovider \
    2>&1 | tee "$OUT/gpu_suite.log"
say "pytest rc=${PIPESTATUS[0]}"
say "done"
}
main "$@" 2>&1 | tee -a "$OUT/gpu_smoke.log"
