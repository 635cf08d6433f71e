"""Baseline (and Unsloth) vs ours on one protocol shape, each side in its own process; a table.

    python bench/compare.py --shape p1 --steps 12 --warmup 3 --out $OUT
    python bench/compare.py --shape p1 --probe-seq --out $OUT          # longest seq at batch 1
    python bench/compare.py --shape tiny --no-quant --steps 6 --warmup 2 --out /tmp/x   # CPU check
    python bench/compare.py --shape p2 --sides baseline,unsloth,engine --out $OUT   # + Unsloth

Builds the random-init model once into --cache (build_model.py), then runs the sides
(baseline_train.py, unsloth_train.py, engine_train.py; --sides picks them and their order) as
subprocesses, so each peak-memory reading belongs to one process. Writes OUT/compare_<shape>.json
+ .md (or OUT/probe_<shape>.json + .md), rewritten after each run, so a run cut short still leaves
what was measured. --budget-s bounds the whole thing: a run that would start past it is skipped,
and each run's timeout is the time left.

When baseline, unsloth and engine all ran ok on the same batches (the 4-bit protocol workload on a
GPU), the comparison's record replaces the one of the same shape and card in
bench/results/vs_unsloth.json (--vs-unsloth; issue 12): that file is written here, never by hand.
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

SIDES = {"baseline": "baseline_train.py", "unsloth": "unsloth_train.py", "engine": "engine_train.py"}
LABELS = {"baseline": "baseline", "unsloth": "Unsloth", "engine": "ours"}
VS_UNSLOTH = HERE / "results" / "vs_unsloth.json"
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


def run_py(script: str, argv: list[str], clock: Clock, pythonpath: str = "") -> tuple[int, str]:
    """Run a bench script in a fresh python; stdout/stderr go straight to ours. (rc, why).
    `pythonpath` goes in front of PYTHONPATH for this script only."""
    limit = clock.timeout()
    if limit < 20:
        return -1, "skipped: out of time budget"
    cmd = [sys.executable, str(HERE / script), *argv]
    log("$ " + " ".join(cmd[1:]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
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
        # The Unsloth side's packages (unsloth, trl, datasets, ...) can live in a folder of their
        # own, so that the other sides' processes never see them.
        site = os.environ.get("CPT_BENCH_UNSLOTH_SITE", "") if side == "unsloth" else ""
        rc, why = run_py(SIDES[side], argv, clock, pythonpath=site)
        try:   # a side may write a result that says why it failed (unsloth_train.py does)
            result = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else None
        except ValueError:
            result = None
        if result is None:
            result = {"side": side, "status": "failed", "error": why or "no result written"}
        elif rc != 0 and result.get("status") == "ok":
            result.update(status="failed", error=why)
        result["wall_s"] = round(time.time() - t0, 1)
        return result


# ---- the side-by-side table ------------------------------------------------------------------
def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(ours, other) -> str:
    return f"{ours / other:.2f}x" if ours and other else "-"


def _ok(r: dict | None) -> bool:
    return bool(r) and r.get("status") == "ok"


def _loss_diff(ours: dict, other: dict) -> str:
    b, o = other.get("mean_loss_timed"), ours.get("mean_loss_timed")
    return f"{(o - b) / b * 100:+.4f}%" if _ok(ours) and _ok(other) and b else "-"


def _max_step_diff(ours: dict, other: dict) -> str:
    if not (_ok(ours) and _ok(other)):
        return "-"
    return f"{max(abs(x - y) / abs(y) * 100 for x, y in zip(ours['losses'], other['losses'])):.4f}%"


def table_columns(results: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(value columns: the sides in protocol order, ratio columns: ours against each other side)."""
    sides = [s for s in SIDES if s in results]
    others = [s for s in sides if s != "engine"] if "engine" in results else []
    return sides, others


def compare_rows(results: dict[str, dict]) -> list[tuple[str, ...]]:
    """Rows of the side-by-side table: a label, one cell per side (table_columns), then ours
    against each other side (a ratio; for losses, ours' difference in percent)."""
    sides, others = table_columns(results)
    ours = results.get("engine", {})
    rows = []
    for key, label, fmt in (("tokens_per_s", "tokens/s", ",.0f"),
                            ("peak_allocated_gib", "peak allocated GiB", ".2f"),
                            ("peak_reserved_gib", "peak reserved GiB", ".2f"),
                            ("allocated_before_step1_gib", "allocated before step 1 GiB", ".2f"),
                            ("allocated_after_step1_gib", "allocated after step 1 GiB", ".2f"),
                            ("load_s", "load + setup s", ".1f")):
        cells = [_num(results[s].get(key), fmt) for s in sides]
        ratios = [_ratio(ours.get(key), results[o].get(key)) if _ok(ours) and _ok(results[o])
                  else "-" for o in others]
        rows.append((label, *cells, *ratios))
    rows.append(("mean loss, timed steps",
                 *[_num(results[s].get("mean_loss_timed"), ".4f") for s in sides],
                 *[_loss_diff(ours, results[o]) for o in others]))
    if _ok(ours) and any(_ok(results[o]) for o in others):
        rows.append(("max per-step loss diff", *[""] * len(sides),
                     *[_max_step_diff(ours, results[o]) for o in others]))
        rows.append(("same batches (sha256)", *[results[s].get("batches_sha256", "-") for s in sides],
                     *[("yes" if results[o].get("batches_sha256") == ours.get("batches_sha256")
                        else "NO") if _ok(results[o]) else "-" for o in others]))
    for side in sides:
        r = results[side]
        if not _ok(r):
            cells = [r.get("status", "-") if s == side else "" for s in sides]
            rows.append((f"{LABELS[side]} status", *cells,
                         *[str(r.get("error", ""))[:120] if i == 0 else "" for i in range(len(others))]))
    return rows


def header(results: list[dict]) -> str:
    v = next((r["versions"] for r in results if r.get("versions")), {})
    keys = ("torch", "transformers", "peft", "bitsandbytes", "triton")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    unsloth = next((r["versions"] for r in results if r.get("side") == "unsloth"
                    and r.get("versions")), None)
    extra = "".join(f" · {k} {unsloth.get(k, '?')}" for k in ("unsloth", "unsloth_zoo")) \
        if unsloth else ""
    return f"{v.get('card', '?')} · " + " · ".join(f"{k} {v.get(k, '?')}" for k in keys) + \
        f"{extra} · {date}"


def workload(args, batch: int, seq: int) -> str:
    quant = "bf16/fp32 base (no quant)" if args.no_quant else "NF4 + double quant base"
    return (f"{TITLES[args.shape]}, {quant}, LoRA r16 on 7 projections + full embed_tokens/lm_head, "
            f"batch {batch} x seq {seq}, {args.steps} steps ({args.warmup} untimed), "
            f"kernels={args.kernels}")


def write_compare(args, results: dict[str, dict], show: bool, suffix: str = "") -> None:
    """OUT/compare_<shape><suffix>.{md,json}; `results` maps side -> result (absent: not asked)."""
    shape = SHAPES[args.shape]
    ours = results.get("engine", {})
    rows = compare_rows(results)
    sides, others = table_columns(results)
    heads = [LABELS[s] for s in sides] + [f"ours / {LABELS[o]}" for o in others]
    title = workload(args, shape['batch'], shape['seq']) + (
        f" — ours with {ours['variant']['args']}" if "variant" in ours else "")
    text = [f"### {title}", "", header(list(results.values())), "",
            "| | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    text += ["| " + " | ".join(row) + " |" for row in rows]
    out = Path(args.out)
    (out / f"compare_{args.shape}{suffix}.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    (out / f"compare_{args.shape}{suffix}.json").write_text(
        json.dumps({"shape": args.shape, **results}, indent=1), "utf-8")
    if not show:
        return
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}\n{header(list(results.values()))}")
    print(f"{'':{width}}" + "".join(f"  {h:>16}" for h in heads))
    for row in rows:
        print(f"{row[0]:{width}}" + "".join(f"  {c:>16}" for c in row[1:]))
    sys.stdout.flush()


# ---- bench/results/vs_unsloth.json (issue 12) -------------------------------------------------
def vs_unsloth_record(results: dict[str, dict], shape: str, date: str | None = None):
    """(record, "") from one comparison where baseline, Unsloth and ours all ran ok on the same
    batches, else (None, why not)."""
    missing = [s for s in ("baseline", "unsloth", "engine") if not _ok(results.get(s))]
    if missing:
        return None, "not ok: " + ", ".join(
            f"{s} {(results.get(s) or {}).get('status', 'not run')}" for s in missing)
    base, uns, ours = results["baseline"], results["unsloth"], results["engine"]
    if len({r.get("batches_sha256") for r in (base, uns, ours)}) != 1:
        return None, "the sides trained on different batches"

    def rounded(value, digits):
        return None if value is None else round(value, digits)

    record = {
        "shape": shape, "card": ours.get("versions", {}).get("card", "?"),
        "date": date or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "unsloth_version": uns.get("versions", {}).get("unsloth", "?"),
        "baseline_tok_s": rounded(base["tokens_per_s"], 1),
        "unsloth_tok_s": rounded(uns["tokens_per_s"], 1),
        "ours_tok_s": rounded(ours["tokens_per_s"], 1),
        "unsloth_peak_gib": rounded(uns.get("peak_allocated_gib"), 3),
        "ours_peak_gib": rounded(ours.get("peak_allocated_gib"), 3),
        "loss_diff_pct": round((ours["mean_loss_timed"] - base["mean_loss_timed"])
                               / base["mean_loss_timed"] * 100, 4),
        "ours_args": ours.get("engine_args", ""),      # engine_train.py settings beyond the defaults
    }
    return record, ""


def update_vs_unsloth(path: Path, record: dict) -> list[dict]:
    """Put `record` into the list in `path`, in place of the one of the same shape and card."""
    records = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    key = (record["shape"], record["card"])
    at = [i for i, r in enumerate(records) if (r.get("shape"), r.get("card")) == key]
    if at:
        records[at[0]] = record
        records = [r for i, r in enumerate(records) if i not in at[1:]]
    else:
        records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return records


def record_vs_unsloth(args, results: dict[str, dict]) -> dict | None:
    """After a comparison with all three sides: the record into --vs-unsloth (if it can be made).
    The default file takes only the protocol's workload (4-bit base, a GPU); a --vs-unsloth PATH
    given takes any (a CPU check of this)."""
    if args.vs_unsloth == "" or not {"baseline", "unsloth", "engine"} <= set(args.sides):
        return None
    record, why = vs_unsloth_record(results, args.shape)
    if record is not None and args.vs_unsloth is None:
        if args.no_quant:
            record, why = None, "not the 4-bit protocol workload (--no-quant)"
        elif record["card"] == "cpu":
            record, why = None, "no GPU"
    path = Path(args.vs_unsloth) if args.vs_unsloth else VS_UNSLOTH
    if record is None:
        print(f"vs_unsloth: no record written ({why})", flush=True)
        return None
    update_vs_unsloth(path, record)
    print(f"vs_unsloth: {path} updated: {json.dumps(record)}", flush=True)
    return record


def compare(args, model: Path, clock: Clock) -> None:
    extra = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.mem_cap_gib:
        extra += ["--mem-cap-gib", str(args.mem_cap_gib)]
    # baseline and ours always have a column (as before Unsloth was a side); Unsloth when asked.
    results = {side: {"side": side, "status": "not run"} for side in SIDES
               if side in args.sides or side != "unsloth"}
    engine_args = args.engine_args.split()
    for i, side in enumerate(args.sides):
        results[side] = run_side(side, model, args, clock,
                                 extra + (engine_args if side == "engine" else []))
        if side == "engine" and engine_args:
            results[side]["engine_args"] = args.engine_args
        write_compare(args, results, show=i == len(args.sides) - 1)
    record_vs_unsloth(args, results)
    # Engine variants (e.g. "nooffload=--offload-checkpoints off") against the same other sides:
    # compare_<shape>_<name>.{md,json}.
    for spec in args.engine_variants:
        name, _, variant_args = spec.partition("=")
        if clock.timeout() < 60:
            print(f"variant {name}: skipped, out of time budget")
            continue
        result = run_side("engine", model, args, clock, extra + engine_args + variant_args.split())
        result["variant"] = {"name": name, "args": variant_args}
        write_compare(args, {**{s: r for s, r in results.items() if s != "engine"},
                             "engine": result}, show=True, suffix=f"_{name}")


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


def sides_arg(text: str) -> list[str]:
    """argparse type of --sides: one or more side names, comma-separated."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SIDES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown side(s) {unknown or text!r}; "
                                         f"choose from {sorted(SIDES)}")
    return names


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
    parser.add_argument("--sides", nargs="+", type=sides_arg, default=[["baseline", "engine"]],
                        help=f"which sides run, in this order: names from {sorted(SIDES)}, "
                             "space- or comma-separated (e.g. baseline,unsloth,engine)")
    parser.add_argument("--probe-seq", action="store_true",
                        help="longest sequence at batch 1 per side (each try its own process)")
    parser.add_argument("--seqs", type=int, nargs="+", default=None,
                        help=f"sequence lengths to probe (default {PROBE_SEQS})")
    parser.add_argument("--engine-seqs", type=int, nargs="+", default=None,
                        help="other lengths for the engine side (e.g. start where the baseline stops)")
    parser.add_argument("--mem-cap-gib", type=float, default=None,
                        help="cap each side's CUDA allocator (GiB; default: 78 with --probe-seq, "
                             "about what an H100 80GB leaves after the CUDA context; else none)")
    parser.add_argument("--engine-args", default="", metavar="ARGS",
                        help="more engine_train.py arguments for our side (and its variants), as one "
                             "string, e.g. '--unchecked-layers=8'; recorded in vs_unsloth.json")
    parser.add_argument("--engine-variants", nargs="*", default=[], metavar="NAME=ARGS",
                        help="extra engine runs against the same baseline, e.g. "
                             "'nooffload=--offload-checkpoints off'")
    parser.add_argument("--vs-unsloth", default=None, metavar="PATH",
                        help="where a comparison of all three sides puts its record (default "
                             "bench/results/vs_unsloth.json, only from a GPU run; '' = nowhere)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    parser.add_argument("--budget-s", type=float, default=0, help="seconds for everything (0 = none)")
    args = parser.parse_args()
    args.sides = list(dict.fromkeys(side for group in args.sides for side in group))
    for spec in args.engine_variants:     # a shell that split "name=--opt value" leaves "name=--opt"
        name, eq, variant_args = spec.partition("=")
        if not (name and eq and variant_args.strip()):
            parser.error(f"engine variant {spec!r}: write NAME=ARGS with ARGS non-empty, e.g. "
                         "'flash=--sdpa-backend flash' in quotes, or flash=--sdpa-backend=flash "
                         "where a shell variable splits on spaces (EXTRA of device_run.sh)")
    if args.mem_cap_gib is None:
        args.mem_cap_gib = 78.0 if args.probe_seq else 0.0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s, args.timeout)
    model = ensure_model(args.shape, Path(args.cache), clock)
    (probe if args.probe_seq else compare)(args, model, clock)


if __name__ == "__main__":
    main()
