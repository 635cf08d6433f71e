"""Baseline vs ours on one protocol shape, each side in its own process; a table and JSON/Markdown.

    python bench/compare.py --shape p1 --steps 12 --warmup 3 --out $OUT
    python bench/compare.py --shape p1 --probe-seq --out $OUT          # longest seq at batch 1
    python bench/compare.py --shape tiny --no-quant --steps 6 --warmup 2 --out /tmp/x   # CPU check

Builds the random-init model once into --cache (build_model.py), then runs baseline_train.py and
engine_train.py as subprocesses, so each peak-memory reading belongs to one process. Writes
OUT/compare_<shape>.json + .md (or OUT/probe_<shape>.json + .md), rewritten after each run, so a
run cut short still leaves what was measured. --budget-s bounds the whole thing: a run that would
start past it is skipped, and each run's timeout is the time left.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHAPES, log  # noqa: E402  (imports torch; CUDA is never initialised here)

SIDES = {"baseline": "baseline_train.py", "engine": "engine_train.py"}
PROBE_SEQS = [4096, 8192, 16384, 32768, 65536, 131072]
TITLES = {"p1": "P1: Llama-3.1-8B shape", "p2": "P2: Llama-3.2-1B shape (untied)",
          "tiny": "tiny (CPU check)"}


class Clock:
    """The whole command's time budget (0 = none)."""

    def __init__(self, budget_s: float, timeout_s: float):
        self.end = time.time() + budget_s if budget_s > 0 else float("inf")
        self.timeout_s = timeout_s

    def timeout(self) -> float:
        return max(0.0, min(self.timeout_s, self.end - time.time()))


def run_py(script: str, argv: list[str], clock: Clock) -> tuple[int, str]:
    """Run a bench script in a fresh python; stdout/stderr go straight to ours. (rc, why)."""
    limit = clock.timeout()
    if limit < 20:
        return -1, "skipped: out of time budget"
    cmd = [sys.executable, str(HERE / script), *argv]
    log("$ " + " ".join(cmd[1:]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        rc = subprocess.run(cmd, env=env, timeout=limit).returncode
    except subprocess.TimeoutExpired:
        return -1, f"timeout after {limit:.0f}s"
    return rc, "" if rc == 0 else f"exit code {rc}"


def ensure_model(shape: str, cache: Path, clock: Clock) -> Path:
    folder = cache / shape
    if not (folder / "config.json").is_file():
        rc, why = run_py("build_model.py", ["--shape", shape, "--out", str(folder)], clock)
        if rc != 0:
            raise SystemExit(f"building the {shape} model failed: {why}")
    return folder


def run_side(side: str, model: Path, args, clock: Clock, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = ["--model", str(model), "--shape", args.shape, "--json-out", str(out), *extra]
        if args.no_quant:
            argv.append("--no-quant")
        if side == "engine":
            argv += ["--kernels", args.kernels]
        t0 = time.time()
        rc, why = run_py(SIDES[side], argv, clock)
        if rc == 0 and out.is_file():
            result = json.loads(out.read_text(encoding="utf-8"))
        else:
            result = {"side": side, "status": "failed", "error": why or "no result written"}
        result["wall_s"] = round(time.time() - t0, 1)
        return result


# ---- the side-by-side table ------------------------------------------------------------------
def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(ours, base) -> str:
    return f"{ours / base:.2f}x" if ours and base else "-"


def compare_rows(base: dict, ours: dict) -> list[tuple[str, str, str, str]]:
    ok = base.get("status") == "ok" and ours.get("status") == "ok"
    rows = []
    for key, label, fmt in (("tokens_per_s", "tokens/s", ",.0f"),
                            ("peak_allocated_gib", "peak allocated GiB", ".2f"),
                            ("peak_reserved_gib", "peak reserved GiB", ".2f"),
                            ("allocated_before_step1_gib", "allocated before step 1 GiB", ".2f"),
                            ("allocated_after_step1_gib", "allocated after step 1 GiB", ".2f"),
                            ("load_s", "load + setup s", ".1f")):
        b, o = base.get(key), ours.get(key)
        rows.append((label, _num(b, fmt), _num(o, fmt), _ratio(o, b) if ok else "-"))
    b, o = base.get("mean_loss_timed"), ours.get("mean_loss_timed")
    diff = f"{(o - b) / b * 100:+.4f}%" if ok and b else "-"
    rows.append(("mean loss, timed steps", _num(b, ".4f"), _num(o, ".4f"), diff))
    if ok:
        worst = max(abs(x - y) / abs(y) * 100 for x, y in zip(ours["losses"], base["losses"]))
        rows.append(("max per-step loss diff", "", "", f"{worst:.4f}%"))
        same = base.get("batches_sha256") == ours.get("batches_sha256")
        rows.append(("same batches (sha256)", base.get("batches_sha256", "-"),
                     ours.get("batches_sha256", "-"), "yes" if same else "NO"))
    for side, r in (("baseline", base), ("ours", ours)):
        if r.get("status") != "ok":
            rows.append((f"{side} status", r.get("status", "-"), r.get("error", ""), ""))
    return rows


def header(results: list[dict]) -> str:
    v = next((r["versions"] for r in results if "versions" in r), {})
    keys = ("torch", "transformers", "peft", "bitsandbytes", "triton")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return f"{v.get('card', '?')} · " + " · ".join(f"{k} {v.get(k, '?')}" for k in keys) + f" · {date}"


def workload(args, batch: int, seq: int) -> str:
    quant = "bf16/fp32 base (no quant)" if args.no_quant else "NF4 + double quant base"
    return (f"{TITLES[args.shape]}, {quant}, LoRA r16 on 7 projections + full embed_tokens/lm_head, "
            f"batch {batch} x seq {seq}, {args.steps} steps ({args.warmup} untimed), "
            f"kernels={args.kernels}")


def write_compare(args, base: dict, ours: dict, show: bool, suffix: str = "") -> None:
    shape = SHAPES[args.shape]
    rows = compare_rows(base, ours)
    title = workload(args, shape['batch'], shape['seq']) + (
        f" — ours with {ours['variant']['args']}" if "variant" in ours else "")
    text = [f"### {title}", "", header([base, ours]), "",
            "| | baseline | ours | ours / baseline |", "|---|---|---|---|"]
    text += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out = Path(args.out)
    (out / f"compare_{args.shape}{suffix}.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    (out / f"compare_{args.shape}{suffix}.json").write_text(
        json.dumps({"shape": args.shape, "baseline": base, "engine": ours}, indent=1), "utf-8")
    if not show:
        return
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}\n{header([base, ours])}")
    print(f"{'':{width}}  {'baseline':>16}  {'ours':>16}  {'ours/base':>10}")
    for a, b, c, d in rows:
        print(f"{a:{width}}  {b:>16}  {c:>16}  {d:>10}")
    sys.stdout.flush()


def compare(args, model: Path, clock: Clock) -> None:
    extra = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.mem_cap_gib:
        extra += ["--mem-cap-gib", str(args.mem_cap_gib)]
    base = ours = {"status": "not run"}
    for i, side in enumerate(args.sides):
        result = run_side(side, model, args, clock, extra)
        if side == "baseline":
            base = result
        else:
            ours = result
        write_compare(args, base, ours, show=i == len(args.sides) - 1)
    # Engine variants (e.g. "nooffload=--offload-checkpoints off") against the same baseline:
    # compare_<shape>_<name>.{md,json}.
    for spec in args.engine_variants:
        name, _, variant_args = spec.partition("=")
        if clock.timeout() < 60:
            print(f"variant {name}: skipped, out of time budget")
            continue
        result = run_side("engine", model, args, clock, extra + variant_args.split())
        result["variant"] = {"name": name, "args": variant_args}
        write_compare(args, base, result, show=True, suffix=f"_{name}")


# ---- --probe-seq -----------------------------------------------------------------------------
def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r.get("status") == "ok":
        return f"ok: {r['peak_allocated_gib']:.1f} GiB, {r['tokens_per_s']:,.0f} tok/s" \
            if r.get("peak_allocated_gib") is not None else f"ok: {r['tokens_per_s']:,.0f} tok/s"
    return r.get("status", "?").upper() if r.get("status") == "oom" else \
        f"{r.get('status')}: {r.get('error', '')}"[:60]


def write_probe(args, table: dict, seqs: list[int], show: bool) -> None:
    results = [r for side in table.values() for r in side.values()]
    best = {side: max((s for s, r in runs.items() if r.get("status") == "ok"), default=0)
            for side, runs in table.items()}
    cap = f"allocator capped at {args.mem_cap_gib:g} GiB" if args.mem_cap_gib else "no cap"
    text = [f"### Longest sequence at batch 1: {TITLES[args.shape]} ({cap}, 2 steps each)", "",
            header(results), "", "| seq | " + " | ".join(table) + " |",
            "|---|" + "---|" * len(table)]
    text += [f"| {s:,} | " + " | ".join(_cell(table[side].get(s)) for side in table) + " |"
             for s in seqs]
    text.append("| longest that ran | " + " | ".join(f"{best[side]:,}" for side in table) + " |")
    out = Path(args.out)
    (out / f"probe_{args.shape}.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    (out / f"probe_{args.shape}.json").write_text(json.dumps(
        {"shape": args.shape, "mem_cap_gib": args.mem_cap_gib, "longest": best,
         "runs": {side: {str(s): r for s, r in runs.items()} for side, runs in table.items()}},
        indent=1), "utf-8")
    if show:
        print("\n" + "\n".join(text), flush=True)


def probe(args, model: Path, clock: Clock) -> None:
    """Per side: up the list until a run fails; if the first one fails, halve down instead."""
    seqs = sorted(args.seqs or PROBE_SEQS)
    table: dict[str, dict[int, dict]] = {side: {} for side in args.sides}
    for side in args.sides:
        queue = sorted(args.engine_seqs) if side == "engine" and args.engine_seqs else list(seqs)
        while queue:
            seq = queue.pop(0)
            extra = ["--batch", "1", "--seq", str(seq), "--steps", "2", "--warmup", "1"]
            if args.mem_cap_gib:
                extra += ["--mem-cap-gib", str(args.mem_cap_gib)]
            result = run_side(side, model, args, clock, extra)
            table[side][seq] = result
            if result.get("status") != "ok":
                ran = [s for s, r in table[side].items() if r.get("status") == "ok"]
                queue = [seq // 2] if not ran and result.get("status") == "oom" and seq >= 2048 else []
            shown = sorted({s for runs in table.values() for s in runs} | set(seqs))
            write_probe(args, table, shown, show=not queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", required=True, help="folder for compare_/probe_<shape>.json/.md")
    parser.add_argument("--cache", default=os.environ.get("CPT_BENCH_CACHE", "/tmp/cpt_bench_models"),
                        help="where the random-init model folders are built once")
    parser.add_argument("--no-quant", action="store_true", help="no bitsandbytes (CPU check)")
    parser.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                        help="engine side's training.kernels")
    parser.add_argument("--sides", nargs="+", choices=sorted(SIDES), default=["baseline", "engine"])
    parser.add_argument("--probe-seq", action="store_true",
                        help="longest sequence at batch 1 per side (each try its own process)")
    parser.add_argument("--seqs", type=int, nargs="+", default=None,
                        help=f"sequence lengths to probe (default {PROBE_SEQS})")
    parser.add_argument("--engine-seqs", type=int, nargs="+", default=None,
                        help="other lengths for the engine side (e.g. start where the baseline stops)")
    parser.add_argument("--mem-cap-gib", type=float, default=None,
                        help="cap each side's CUDA allocator (GiB; default: 78 with --probe-seq, "
                             "about what an H100 80GB leaves after the CUDA context; else none)")
    parser.add_argument("--engine-variants", nargs="*", default=[], metavar="NAME=ARGS",
                        help="extra engine runs against the same baseline, e.g. "
                             "'nooffload=--offload-checkpoints off'")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    parser.add_argument("--budget-s", type=float, default=0, help="seconds for everything (0 = none)")
    args = parser.parse_args()
    if args.mem_cap_gib is None:
        args.mem_cap_gib = 78.0 if args.probe_seq else 0.0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s, args.timeout)
    model = ensure_model(args.shape, Path(args.cache), clock)
    (probe if args.probe_seq else compare)(args, model, clock)


if __name__ == "__main__":
    main()
