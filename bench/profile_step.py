"""Where one training step's time goes: torch.profiler over a few steps of P1/P2, by kernel and category.

    python bench/profile_step.py --shape p1 --out $OUT                     # ours (engine side)
    python bench/profile_step.py --shape p1 --sides engine baseline --out $OUT
    python bench/profile_step.py --shape tiny --no-quant --out /tmp/prof   # CPU check (CPU ops)

Each side runs in its own process (this script again, with --worker), set up exactly as
bench/engine_train.py / bench/baseline_train.py do (their functions are reused), on the same seeded
batches. It runs --warm-steps unprofiled steps (timed on the host clock, synchronised), then
profiles --profile-steps steps with torch.profiler (CUDA activities on a GPU, CPU activities on a
CPU; record_shapes for the GEMM split) and reads the exported trace:

- every GPU kernel / memcpy / memset (on a CPU: every CPU op, by self time) is put in a category,
  from its name, the CPU op that launched it (with its input shapes) and that op's enclosing ranges;
- step wall time (host clock around each profiled step, synchronised) and GPU-busy fraction
  (union of kernel intervals / profiled wall);
- the top kernels by self time with % of the profiled step time.

Bench-only instrumentation, nothing in the engine changes: record_function ranges around the step's
phases and around the fused linear+CE forward (cpt_studio.kernels), so that its GEMMs and dW
accumulation count as lm_head+CE. Writes OUT/profile_<shape>.json and .md (sides merged with what a
previous call wrote there) and OUT/trace_<shape>_<side>.json.gz when it is under --max-trace-mb.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()

# Display order of the categories.
CATEGORIES = [
    "4-bit dequantize (NF4)",
    "GEMM: base projections (bf16)",
    "GEMM: LoRA (r=16)",
    "attention (SDPA)",
    "RMSNorm (Triton)",
    "SwiGLU (Triton)",
    "RoPE (Triton)",
    "lm_head + CE: GEMMs",
    "lm_head + CE: other (CE kernels, dW accumulate, casts)",
    "embedding fwd/bwd",
    "grad-norm clip",
    "optimizer step (AdamW fused + bnb 8-bit)",
    "elementwise / casts / reductions",
    "memcpy / memset",
    "other",
]
PHASES = ["forward", "backward (incl. recompute)", "clip_grad_norm", "optimizer_step", "zero_grad"]


# ---- the worker: one side, set up as in its training script ----------------------------------
def setup_side(args, device):
    """(loss_fn, optimizer, model, extra) built the way engine_train.py / baseline_train.py do."""
    batch, seq = common.resolve_sizes(args)
    if args.worker == "engine":
        import engine_train

        cfg = engine_train.run_config(args, batch, seq, device)
        model, optimizer, _groups, loss_fn, kernels, _emb = engine_train.setup(cfg, device)
        _range_fused_ce()
        from cpt_studio.engine.train.grad_clip import clip_grad_norm

        return loss_fn, optimizer, model, {"kernels": [str(k) for k in kernels],
                                           "precision": cfg.model.precision, "clip": clip_grad_norm}
    import baseline_train

    model = baseline_train.prepare(baseline_train.load(args, device), args)
    optimizer = baseline_train.optimizer_for(model)
    autocast = device.type == "cuda"

    def loss_fn(input_ids):
        import torch

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=input_ids, labels=input_ids).loss

    return loss_fn, optimizer, model, {}


def _range_fused_ce() -> None:
    """Wrap the fused linear+CE forward (which also computes its grads) in a named range."""
    import torch

    mod = sys.modules.get("cpt_studio.kernels.fused_linear_cross_entropy")
    if mod is None or not hasattr(mod, "fused_linear_cross_entropy_forward"):
        return
    inner = mod.fused_linear_cross_entropy_forward

    def wrapped(*a, **k):
        with torch.profiler.record_function("bench/fused_linear_ce"):
            return inner(*a, **k)

    mod.fused_linear_cross_entropy_forward = wrapped


def train_step(loss_fn, optimizer, params, batch, device, rf, clip=None):
    import torch

    clip = clip or torch.nn.utils.clip_grad_norm_
    with rf("bench/forward"):
        loss = loss_fn(batch.to(device, non_blocking=True))
    with rf("bench/backward"):
        loss.backward()
    with rf("bench/clip_grad_norm"):
        clip(params, common.MAX_GRAD_NORM)
    with rf("bench/optimizer_step"):
        optimizer.step()
    with rf("bench/zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    value = float(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return value


def worker(args) -> None:
    import contextlib

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    batch, seq = common.resolve_sizes(args)
    result = {"side": args.worker, "shape": args.shape, "batch": batch, "seq": seq,
              "warm_steps": args.warm_steps, "profile_steps": args.profile_steps,
              "versions": common.versions(), "status": "ok"}
    device = common.pick_device(args.mem_cap_gib)
    cuda = device.type == "cuda"
    t0 = time.time()
    loss_fn, optimizer, model, extra = setup_side(args, device)
    clip = extra.pop("clip", None)
    result.update(extra, load_s=time.time() - t0)
    vocab = model.get_input_embeddings().num_embeddings
    steps = args.warm_steps + args.profile_steps
    batches = common.make_batches(vocab, batch, seq, steps, args.seed)
    result["batches_sha256"] = common.batches_digest(batches)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    no_range = lambda name: contextlib.nullcontext()  # noqa: E731
    warm_times, losses = [], []
    for i in range(args.warm_steps):
        t = time.perf_counter()
        losses.append(train_step(loss_fn, optimizer, params, batches[i], device, no_range, clip))
        warm_times.append(time.perf_counter() - t)
    common.log(f"{args.worker}: warm steps {[round(x * 1000) for x in warm_times]} ms; profiling "
               f"{args.profile_steps}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof_times = []
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(args.warm_steps, steps):
            t = time.perf_counter()
            with record_function(f"bench/step{i}"):
                losses.append(train_step(loss_fn, optimizer, params, batches[i], device,
                                         record_function, clip))
            prof_times.append(time.perf_counter() - t)
    result.update(losses=losses, warm_step_times_s=warm_times, profiled_step_times_s=prof_times,
                  peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    # Steps after the first warm one show the steady state (the first compiles / allocates).
    steady = warm_times[1:] or warm_times
    result["unprofiled_step_ms_median"] = statistics.median(steady) * 1000
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        t = time.time()
        prof.export_chrome_trace(str(trace))
        if args.trace_out:   # first, so that a failed analysis can be redone from the file
            data = gzip.compress(trace.read_bytes(), compresslevel=6)
            if len(data) <= args.max_trace_mb * 2**20:
                Path(args.trace_out).write_bytes(data)
                result["trace_file"] = Path(args.trace_out).name
            else:
                result["trace_file"] = f"not kept: {len(data) / 2**20:.0f} MiB gzipped"
        try:
            result.update(analyse_trace(json.loads(trace.read_text(encoding="utf-8")), cuda,
                                        vocab, common.LORA_R, args.profile_steps))
        except Exception as exc:   # keep the run's other numbers and the torch table
            import traceback

            traceback.print_exc()
            result.update(status="analysis failed", error=repr(exc)[:300])
        result["trace_export_and_analysis_s"] = round(time.time() - t, 1)
    sort_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    try:
        result["torch_table"] = prof.key_averages().table(sort_by=sort_key, row_limit=25,
                                                          max_name_column_width=70)
    except Exception as exc:   # the column name moved between torch versions
        try:
            result["torch_table"] = prof.key_averages().table(
                sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
        except Exception:
            result["torch_table"] = f"(key_averages table failed: {exc})"
    result["tokens_per_step"] = batch * seq
    Path(args.json_out).write_text(json.dumps(result) + "\n", encoding="utf-8")


# ---- reading the trace ------------------------------------------------------------------------
class Ev:
    __slots__ = ("name", "cat", "ts", "end", "args", "parent", "children_dur")

    def __init__(self, e: dict):
        self.name, self.cat = e.get("name", ""), e.get("cat", "")
        self.ts = float(e.get("ts", 0.0))
        self.end = self.ts + float(e.get("dur", 0.0))
        self.args = e.get("args", {}) or {}
        self.parent = None
        self.children_dur = 0.0


def _nest(events: list[Ev]) -> None:
    """Set .parent (innermost enclosing event on the same thread) and .children_dur."""
    events.sort(key=lambda e: (e.ts, -(e.end - e.ts)))
    stack: list[Ev] = []
    for ev in events:
        while stack and ev.ts >= stack[-1].end:
            stack.pop()
        if stack:
            ev.parent = stack[-1]
            if ev.cat in ("cpu_op", "user_annotation"):
                stack[-1].children_dur += ev.end - ev.ts
        stack.append(ev)


def _dims(op: Ev | None) -> set[int]:
    out: set[int] = set()
    if op is None:
        return out
    for shape in op.args.get("Input Dims", []) or []:
        if isinstance(shape, list):
            out.update(int(d) for d in shape if isinstance(d, (int, float)))
    return out


def classify(name: str, op: Ev | None, chain: list[str], vocab: int, rank: int, cuda: bool) -> str:
    """Category of one kernel (or, on a CPU, one op) from its name, launching op and ranges."""
    low = name.lower()
    ch = " | ".join(chain).lower()
    if low.startswith(("memcpy", "memset")) or "memcpy" in low and not cuda:
        return "memcpy / memset"
    if "bench/optimizer_step" in ch or "optimizer.step" in ch or "koptimizer" in low:
        return "optimizer step (AdamW fused + bnb 8-bit)"
    if "bench/clip_grad_norm" in ch:
        return "grad-norm clip"
    if ("dequantize" in low or "_nf4_dequant" in low or "dequantize_4bit" in ch
            or "nf4_dequant" in ch):
        return "4-bit dequantize (NF4)"
    if "_rmsnorm" in low or "rmsnorm" in low:
        return "RMSNorm (Triton)"
    if "_swiglu" in low or "swiglu" in low:
        return "SwiGLU (Triton)"
    if "_rope" in low or "_rotate_heads" in low:
        return "RoPE (Triton)"
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa", "attn")) or any(
            k in ch for k in ("scaled_dot_product", "flash_attention", "efficient_attention")):
        return "attention (SDPA)"
    dims = _dims(op)
    gemm = (any(k in low for k in ("gemm", "nvjet", "xmma", "cublas", "splitk", "wgmma", "cutlass"))
            if cuda else name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                  "aten::addmm_", "aten::linear"))
    in_ce = ("bench/fused_linear_ce" in ch or "cross_entropy" in ch or "nll_loss" in ch
             or "log_softmax" in ch or "_cross_entropy" in low or "linearcrossentropy" in ch)
    if "embedding" in ch or "embedding" in low:
        return "embedding fwd/bwd"
    if gemm:
        if in_ce or vocab in dims:
            return "lm_head + CE: GEMMs"
        # engine/speed/lora_group.py stacks 2 or 3 adapters' A: its GEMMs have 2r or 3r in a dim
        lora = any(k * rank in dims for k in (1, 2, 3))
        return "GEMM: LoRA (r=16)" if lora else "GEMM: base projections (bf16)"
    if in_ce or vocab in dims:
        return "lm_head + CE: other (CE kernels, dW accumulate, casts)"
    if cuda:
        if any(k in low for k in ("elementwise", "copy", "reduce", "fill", "cat", "index",
                                  "scatter", "gather", "vectorized", "unrolled", "pointwise",
                                  "triton_", "softmax", "norm", "sum", "mean", "where", "neg")):
            return "elementwise / casts / reductions"
        return "other"
    return "elementwise / casts / reductions" if name.startswith("aten::") else "other"


def _phase(chain: list[str]) -> str:
    for name in chain:
        if name.startswith("bench/") and not name.startswith(("bench/step", "bench/fused")):
            return {"bench/forward": "forward", "bench/backward": "backward (incl. recompute)"}.get(
                name, name[len("bench/"):])
    return "backward (incl. recompute)"   # the autograd engine's device thread


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + ((cur_e - cur_s) if cur_e is not None else 0.0)


def idle_split(launched: list[tuple[float, float, float]], steps: list[tuple[float, float]]) -> tuple[float, float]:
    """(us the main stream waited for the host to launch its next kernel, us it idled otherwise).

    `launched`: (launch call's end on the host, kernel start, kernel end) of the kernels of one
    stream; `steps`: the profiled steps' host intervals. Inside a step, each gap between one
    kernel's end and the next one's start is the host's fault for as long as the next launch had
    not returned yet; the rest of the gap is a wait on something else (another stream's event, a
    synchronisation, the allocator). Under the profiler the host is slower than in a real run, so
    the first number is an upper bound.
    """
    host = other = 0.0
    ordered = sorted(launched, key=lambda k: k[1])
    for (_, _, prev_end), (launch_end, start, _) in zip(ordered, ordered[1:]):
        if start <= prev_end or not any(a <= prev_end and start <= b for a, b in steps):
            continue
        waited_for_launch = min(start, max(launch_end, prev_end)) - prev_end
        host += waited_for_launch
        other += (start - prev_end) - waited_for_launch
    return host, other


def analyse_trace(trace: dict, cuda: bool, vocab: int, rank: int, n_steps: int) -> dict:
    raw = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    host_cats = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")
    by_thread: dict = defaultdict(list)
    device_evs, corr_to_rt, ext_to_op = [], {}, {}
    for e in raw:
        cat = e.get("cat", "")
        if cat in host_cats:
            ev = Ev(e)
            by_thread[(e.get("pid"), e.get("tid"))].append(ev)
            if cat in ("cuda_runtime", "cuda_driver") and "correlation" in ev.args:
                corr_to_rt[ev.args["correlation"]] = ev
            if cat == "cpu_op" and "External id" in ev.args:
                ext_to_op[ev.args["External id"]] = ev
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            device_evs.append(Ev(e))
    for evs in by_thread.values():
        _nest(evs)
    steps = sorted((ev for evs in by_thread.values() for ev in evs
                    if ev.cat == "user_annotation" and ev.name.startswith("bench/step")),
                   key=lambda ev: ev.ts)
    wall_us = sum(ev.end - ev.ts for ev in steps) or None

    def chain_of(ev: Ev | None) -> list[str]:
        out = []
        while ev is not None:
            if ev.cat in ("cpu_op", "user_annotation"):
                out.append(ev.name)
            ev = ev.parent
        return out

    units = []   # (name, self_us, op, chain, interval)
    per_stream: dict = defaultdict(list)   # stream -> (launch end, start, end) of its kernels
    if cuda:
        for k in device_evs:
            rt = corr_to_rt.get(k.args.get("correlation"))
            start = rt.parent if rt is not None else ext_to_op.get(k.args.get("External id"))
            op = start
            while op is not None and op.cat != "cpu_op":
                op = op.parent
            name = k.name if k.cat == "kernel" else ("Memcpy " if k.cat == "gpu_memcpy"
                                                      else "Memset ") + k.name
            units.append((name, k.end - k.ts, op, chain_of(start), (k.ts, k.end)))
            if rt is not None:
                per_stream[k.args.get("stream")].append((rt.end, k.ts, k.end))
    else:
        for evs in by_thread.values():
            for ev in evs:
                if ev.cat != "cpu_op":
                    continue
                self_us = max(0.0, ev.end - ev.ts - ev.children_dur)
                if self_us > 0:
                    units.append((ev.name, self_us, ev, chain_of(ev), (ev.ts, ev.end)))
    per_cat: dict = defaultdict(float)
    per_phase: dict = defaultdict(float)
    per_name: dict = {}
    for name, us, op, chain, _ in units:
        cat = classify(name, op, chain, vocab, rank, cuda)
        per_cat[cat] += us
        per_phase[_phase(chain)] += us
        short = name if len(name) <= 120 else name[:117] + "..."
        row = per_name.setdefault((short, cat), {"name": short, "category": cat, "us": 0.0,
                                                 "calls": 0})
        row["us"] += us
        row["calls"] += 1
    busy_us = sum(u[1] for u in units)
    union_us = _union([u[4] for u in units]) if cuda else None
    denom = wall_us or busy_us or 1.0
    cats = [{"category": c, "ms_per_step": per_cat[c] / 1000 / n_steps,
             "pct_of_step": 100 * per_cat[c] / denom,
             "pct_of_busy": 100 * per_cat[c] / (busy_us or 1.0)}
            for c in CATEGORIES if per_cat.get(c)]
    top = sorted(per_name.values(), key=lambda r: -r["us"])[:25]
    for r in top:
        r.update(ms_per_step=r["us"] / 1000 / n_steps, pct_of_step=100 * r["us"] / denom,
                 calls_per_step=r["calls"] / n_steps)
        del r["us"], r["calls"]
    host_idle = other_idle = None
    if per_stream:   # the compute stream: the one with the most kernel time
        main = max(per_stream.values(), key=lambda ks: sum(e - b for _, b, e in ks))
        host_idle, other_idle = idle_split(main, [(ev.ts, ev.end) for ev in steps])
    return {
        "activities": "CPU+CUDA (device kernels)" if cuda else "CPU (ops by self time)",
        "idle_waiting_for_launch_ms_per_step": (host_idle / 1000 / n_steps
                                                if host_idle is not None else None),
        "idle_other_ms_per_step": other_idle / 1000 / n_steps if other_idle is not None else None,
        "profiled_wall_ms_per_step": (wall_us or 0) / 1000 / n_steps,
        "kernel_sum_ms_per_step": busy_us / 1000 / n_steps,
        "kernel_union_ms_per_step": union_us / 1000 / n_steps if union_us is not None else None,
        "gpu_busy_fraction": (union_us / wall_us) if (cuda and wall_us) else None,
        "units_per_step": len(units) / n_steps,
        "categories": cats,
        "phases": [{"phase": p, "ms_per_step": per_phase[p] / 1000 / n_steps,
                    "pct_of_step": 100 * per_phase[p] / denom} for p in PHASES if per_phase.get(p)],
        "top": top,
    }


# ---- the parent: model, one process per side, the tables -------------------------------------
def markdown(shape: str, sides: dict) -> str:
    lines = [f"## Step profile, shape {shape}", ""]
    for side, r in sides.items():
        if r.get("status") != "ok" and "categories" not in r:
            lines += [f"### {side}: {r.get('status')} {r.get('error', '')}", "",
                      f"warm step times s: {r.get('warm_step_times_s')}", "", "```",
                      r.get("torch_table", ""), "```", ""]
            continue
        v = r["versions"]
        lines += [f"### {side} ({'ours' if side == 'engine' else 'plain transformers+peft+bnb'}), "
                  f"batch {r['batch']} x {r['seq']}, {r['profile_steps']} profiled steps after "
                  f"{r['warm_steps']} warm", "",
                  f"{v.get('card')} · torch {v.get('torch')} · transformers {v.get('transformers')} · "
                  f"peft {v.get('peft')} · bitsandbytes {v.get('bitsandbytes')} · triton "
                  f"{v.get('triton')} · {r.get('date', '')} · {r['activities']}", ""]
        busy = r.get("gpu_busy_fraction")
        lines += [f"- unprofiled step (median of warm steps 2..): {r['unprofiled_step_ms_median']:.0f} ms"
                  f" ({r['tokens_per_step'] / r['unprofiled_step_ms_median'] * 1000:,.0f} tok/s)",
                  f"- profiled step wall: {r['profiled_wall_ms_per_step']:.0f} ms; kernel time "
                  f"(sum) {r['kernel_sum_ms_per_step']:.0f} ms"
                  + (f", union {r['kernel_union_ms_per_step']:.0f} ms, GPU busy {busy:.1%}"
                     if busy is not None else ""),
                  *([f"- compute stream idle inside the steps: {r['idle_waiting_for_launch_ms_per_step']:.0f} ms "
                     f"a step waiting for the host to launch the next kernel (an upper bound: the "
                     f"profiler slows the host), {r['idle_other_ms_per_step']:.0f} ms waiting on "
                     f"anything else"] if r.get("idle_waiting_for_launch_ms_per_step") is not None else []),
                  f"- kernels (or ops) per step: {r['units_per_step']:,.0f}; peak allocated: "
                  + (f"{r['peak_allocated_gib']:.2f} GiB" if r.get("peak_allocated_gib") else "-"),
                  "", "| category | ms / step | % of step wall | % of kernel time |", "|---|---|---|---|"]
        lines += [f"| {c['category']} | {c['ms_per_step']:.1f} | {c['pct_of_step']:.1f}% | "
                  f"{c['pct_of_busy']:.1f}% |" for c in r["categories"]]
        lines += ["", "| phase | ms / step | % of step wall |", "|---|---|---|"]
        lines += [f"| {p['phase']} | {p['ms_per_step']:.1f} | {p['pct_of_step']:.1f}% |"
                  for p in r["phases"]]
        lines += ["", "| # | kernel | category | ms / step | % of step | calls / step |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {i} | `{t['name'].replace('|', '/')}` | {t['category']} | "
                  f"{t['ms_per_step']:.2f} | {t['pct_of_step']:.1f}% | {t['calls_per_step']:.0f} |"
                  for i, t in enumerate(r["top"], 1)]
        lines += ["", "<details><summary>torch key_averages (top 25 by self time)</summary>", "",
                  "```", r.get("torch_table", ""), "```", "</details>", ""]
    return "\n".join(lines) + "\n"


def parent(args) -> None:
    import compare

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = compare.Clock(args.budget_s, args.timeout)
    model = compare.ensure_model(args.shape, Path(args.cache), clock)
    path = out / f"profile_{args.shape}.json"
    sides = json.loads(path.read_text(encoding="utf-8"))["sides"] if path.is_file() else {}
    for side in args.sides:
        limit = clock.timeout()
        if limit < 30:
            sides[side] = {"status": "skipped", "error": "out of time budget"}
            continue
        with tempfile.TemporaryDirectory() as tmp:
            js = Path(tmp) / "r.json"
            cmd = [sys.executable, str(SCRIPT), "--worker", side, "--model", str(model),
                   "--shape", args.shape, "--json-out", str(js), "--warm-steps", str(args.warm_steps),
                   "--profile-steps", str(args.profile_steps), "--kernels", args.kernels,
                   "--trace-out", str(out / f"trace_{args.shape}_{side}.json.gz") if args.keep_trace
                   else "", "--max-trace-mb", str(args.max_trace_mb)]
            if args.no_quant:
                cmd.append("--no-quant")
            if args.batch or args.seq:
                cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
            if args.mem_cap_gib:
                cmd += ["--mem-cap-gib", str(args.mem_cap_gib)]
            common.log("$ " + " ".join(cmd[1:]))
            t0 = time.time()
            try:
                rc = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                    timeout=limit).returncode
                why = "" if rc == 0 else f"exit code {rc}"
            except subprocess.TimeoutExpired:
                rc, why = -1, f"timeout after {limit:.0f}s"
            r = json.loads(js.read_text(encoding="utf-8")) if rc == 0 and js.is_file() else \
                {"status": "failed", "error": why or "no result written"}
            r["wall_s"] = round(time.time() - t0, 1)
            r.setdefault("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        sides[side] = r
        path.write_text(json.dumps({"shape": args.shape, "sides": sides}, indent=1), "utf-8")
        (out / f"profile_{args.shape}.md").write_text(markdown(args.shape, sides), "utf-8")
    print("\n" + markdown(args.shape, {s: sides[s] for s in args.sides}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(common.SHAPES), required=True)
    parser.add_argument("--out", default="", help="folder for profile_<shape>.json/.md")
    parser.add_argument("--sides", nargs="+", choices=("engine", "baseline"), default=["engine"])
    parser.add_argument("--warm-steps", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--kernels", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--no-quant", action="store_true", help="no bitsandbytes (CPU check)")
    parser.add_argument("--mem-cap-gib", type=float, default=0.0)
    parser.add_argument("--cache", default=os.environ.get("CPT_BENCH_CACHE", "/tmp/cpt_bench_models"))
    parser.add_argument("--budget-s", type=float, default=0, help="seconds for everything (0 = none)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per side")
    parser.add_argument("--keep-trace", action="store_true", help="write trace_<shape>_<side>.json.gz")
    parser.add_argument("--max-trace-mb", type=float, default=15)
    parser.add_argument("--analyse", default="", help="print the analysis of a kept trace .json.gz")
    # worker-only arguments (engine_train.run_config and baseline_train.load/prepare read these)
    parser.add_argument("--worker", choices=("engine", "baseline"), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--trace-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=0, help="micro-batch (0 = the shape's)")
    parser.add_argument("--seq", type=int, default=0, help="sequence length (0 = the shape's)")
    parser.add_argument("--seed", type=int, default=common.SEED)
    args = parser.parse_args()
    # The attributes the training scripts' setup functions expect.
    args.steps = args.warm_steps + args.profile_steps
    args.embedding_optimizer, args.fp32_stream, args.keep_frozen_embeddings = "auto", False, False
    args.embedding_weights, args.dense_embedding_grad, args.offload_checkpoints = "auto", False, "auto"
    args.lora_optimizer, args.eager_head_grad = "adamw", False
    args.upcast_trainable = False
    if args.analyse:   # redo the tables from a kept trace: --analyse T.json.gz --shape p1
        trace = json.loads(gzip.decompress(Path(args.analyse).read_bytes()))
        vocab = common.SHAPES[args.shape]["config"]["vocab_size"]
        cuda = any(e.get("cat") == "kernel" for e in trace.get("traceEvents", []))
        print(json.dumps(analyse_trace(trace, cuda, vocab, common.LORA_R, args.profile_steps),
                         indent=1))
    elif args.worker:
        worker(args)
    else:
        if not args.out:
            parser.error("--out is required")
        parent(args)


if __name__ == "__main__":
    main()
