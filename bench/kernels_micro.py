"""Micro-benchmark: forward + backward of each kernel vs its PyTorch reference, on one GPU.

Usage (on the device): python bench/kernels_micro.py [--quick]
Prints one row per case: median time of fwd+bwd (triton.testing.do_bench, fresh random inputs,
grads reset between runs), peak extra memory of one fwd+bwd, and the relative error of the
kernel's output vs the reference. The baseline is measured in the same run, on the same inputs.
Last, the 8-bit AdamW step vs bitsandbytes' AdamW8bit (--only adamw8bit runs just those rows) and
the one-launch NF4 dequantize vs bitsandbytes' (--only nf4).
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F


def _peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _case(name, kernel, reference, leaves, rep=200):
    """kernel/reference: () -> output tensor whose backward runs inside; leaves get grads reset."""
    import triton.testing

    def run(fn):
        return lambda: fn()

    rows = []
    outs = {}
    for label, fn in (("torch", reference), ("kernel", kernel)):
        for t in leaves:
            t.grad = None
        outs[label] = fn().detach().float()
        peak = _peak_gib(fn)
        ms = triton.testing.do_bench(run(fn), warmup=25, rep=rep, grad_to_none=leaves, return_mode="median")
        rows.append((label, ms, peak))
    err = ((outs["kernel"] - outs["torch"]).norm() / outs["torch"].norm()).item()
    (_, t_ref, m_ref), (_, t_k, m_k) = rows
    print(f"| {name} | {t_ref:.3f} | {t_k:.3f} | {t_ref / t_k:.2f}x | {m_ref:.2f} | {m_k:.2f} | {err:.1e} |",
          flush=True)


def _adamw8bit_cases(quick: bool) -> None:
    """One optimizer step of a Llama-3-8B embedding (bf16 param, 8-bit states, stochastic rounding)
    with a dense bf16 grad and with a 4096-row sparse grad, vs bitsandbytes' AdamW8bit on an fp32
    param of the same shape (torch fused AdamW when bitsandbytes is missing). Columns: baseline
    ms, ours ms, speed-up, peak extra GiB of one step each; no error column (different math)."""
    import itertools

    import triton.testing

    from cpt_studio.kernels.adamw8bit import adamw8bit_step, init_adamw8bit_state

    rows, cols = (32000, 2048) if quick else (128256, 4096)
    dev, n = "cuda", rows * cols
    grad = (torch.randn(rows, cols, device=dev) * 1e-3).to(torch.bfloat16)
    weight = torch.nn.Parameter(torch.randn(rows, cols, device=dev) * 0.02)
    weight.grad = grad.float()
    try:
        import bitsandbytes as bnb

        baseline, opt = "bnb AdamW8bit", bnb.optim.AdamW8bit([weight], lr=5e-6)
    except ImportError:
        baseline, opt = "torch fused AdamW", torch.optim.AdamW([weight], lr=5e-6, fused=True)
    opt.step()   # states are allocated on the first step
    t_base = triton.testing.do_bench(opt.step, warmup=25, rep=200, return_mode="median")
    m_base = _peak_gib(opt.step)
    del opt, weight

    param = (torch.randn(rows, cols, device=dev) * 0.02).to(torch.bfloat16)
    state = init_adamw8bit_state(param)
    steps = itertools.count(1)
    index = torch.randperm(rows, device=dev)[:4096]
    for label, g in (("dense bf16 grad", grad), ("sparse grad, 4096 rows", (index, grad[index].clone()))):
        def step(g=g):
            t = next(steps)
            adamw8bit_step(param, g, state, step=t, lr=5e-6, weight_decay=0.0, seed=t)
        step()
        ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
        peak = _peak_gib(step)
        if g is grad:   # bf16 p read + write, bf16 g read, m and v codes read + write
            label += f", {10 * n / ms / 1e6:.0f} GB/s at 10 B/element"
        print(f"| AdamW 8-bit step {rows}x{cols} bf16, {label} (baseline: {baseline}, fp32 param) | "
              f"{t_base:.3f} | {ms:.3f} | {t_base / ms:.2f}x | {m_base:.2f} | {peak:.2f} | n/a |", flush=True)


def _nf4_cases(quick: bool) -> None:
    """Dequantizing a double-quantized NF4 weight to bf16 (the P1 gate/up/down shape): one Triton
    launch vs bitsandbytes' dequantize_4bit (two launches and an add). Columns as above; rel err
    of ours vs bitsandbytes."""
    import bitsandbytes.functional as bnbf
    import triton.testing

    from cpt_studio.kernels.nf4_dequant import nf4_dequant

    shape = (1024, 4096) if quick else (14336, 4096)
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    nested = (qs.state2.absmax, qs.state2.code, qs.state2.blocksize, qs.offset)
    ours = lambda: nf4_dequant(packed, qs.code, qs.absmax, qs.blocksize, qs.shape, torch.bfloat16, nested)  # noqa: E731
    theirs = lambda: bnbf.dequantize_4bit(packed, qs)  # noqa: E731
    t_base = triton.testing.do_bench(theirs, warmup=25, rep=200, return_mode="median")
    t_ours = triton.testing.do_bench(ours, warmup=25, rep=200, return_mode="median")
    err = ((ours().float() - theirs().float()).norm() / theirs().float().norm()).item()
    n = shape[0] * shape[1]
    print(f"| NF4 dequantize {shape[0]}x{shape[1]} -> bf16, double quant ({2.5 * n / t_ours / 1e6:.0f} "
          f"GB/s at 2.5 B/element) | {t_base:.3f} | {t_ours:.3f} | {t_base / t_ours:.2f}x | "
          f"{_peak_gib(theirs):.2f} | {_peak_gib(ours):.2f} | {err:.1e} |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes (smoke test)")
    ap.add_argument("--only", choices=("all", "adamw8bit", "nf4"), default="all",
                    help="run one group of cases")
    args = ap.parse_args(argv)
    import transformers
    import triton

    from cpt_studio.kernels.fused_linear_cross_entropy import (
        fused_linear_cross_entropy, linear_cross_entropy_reference)
    from cpt_studio.kernels.rmsnorm import RMSNormFunction, rmsnorm_reference
    from cpt_studio.kernels.rope import RopeFunction, rope_reference
    from cpt_studio.kernels.swiglu import SwiGLUFunction, swiglu_reference

    dev, bf16 = "cuda", torch.bfloat16
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"transformers {transformers.__version__} | {datetime.date.today()}")
    print("| case | torch ms | kernel ms | speed-up | torch peak GiB | kernel peak GiB | rel err |")
    print("|---|---|---|---|---|---|---|")
    n = 1024 if args.quick else 8192
    if args.only == "adamw8bit":
        _adamw8bit_cases(args.quick)
        return 0
    if args.only == "nf4":
        _nf4_cases(args.quick)
        return 0

    x = torch.randn(n, 4096, device=dev, dtype=bf16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(4096, device=dev)).to(bf16).requires_grad_()
    dy = torch.randn_like(x)

    def bwd(y, g):
        y.backward(g)
        return y

    _case(f"RMSNorm {n}x4096 bf16", lambda: bwd(RMSNormFunction.apply(x, w, 1e-6), dy),
          lambda: bwd(rmsnorm_reference(x, w, 1e-6), dy), [x, w])
    xd, wd = x.detach(), w.detach()
    _case(f"RMSNorm {n}x4096 bf16, forward only", lambda: RMSNormFunction.apply(xd, wd, 1e-6),
          lambda: rmsnorm_reference(xd, wd, 1e-6), [])

    g = torch.randn(n, 14336, device=dev, dtype=bf16, requires_grad=True)
    u = torch.randn(n, 14336, device=dev, dtype=bf16, requires_grad=True)
    dy = torch.randn_like(g)
    _case(f"SwiGLU {n}x14336 bf16", lambda: bwd(SwiGLUFunction.apply(g, u), dy),
          lambda: bwd(swiglu_reference(g, u), dy), [g, u])

    b, s = n // 2048 or 1, min(n, 2048)
    q = torch.randn(b, s, 32, 128, device=dev, dtype=bf16).transpose(1, 2).requires_grad_()
    k = torch.randn(b, s, 8, 128, device=dev, dtype=bf16).transpose(1, 2).requires_grad_()
    freqs = torch.arange(s, device=dev).float()[:, None] / 10000 ** (torch.arange(0, 128, 2, device=dev) / 128)
    emb = torch.cat((freqs, freqs), -1)[None]
    cos, sin = emb.cos().to(bf16), emb.sin().to(bf16)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def rope_bwd(pair):
        torch.autograd.backward(pair, (dq, dk))
        return pair[0]

    _case(f"RoPE q{b}x32x{s}x128 k 8 heads bf16", lambda: rope_bwd(RopeFunction.apply(q, k, cos, sin)),
          lambda: rope_bwd(rope_reference(q, k, cos, sin)), [q, k])

    vocab, hidden = (32000, 2048) if args.quick else (128256, 4096)
    h = torch.randn(n, hidden, device=dev, dtype=bf16, requires_grad=True)
    wt = (torch.randn(vocab, hidden, device=dev) / hidden ** 0.5).to(bf16).requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=dev)
    labels[::97] = -100

    def loss_bwd(loss):
        loss.backward()
        return loss

    shape = f"N={n} H={hidden} V={vocab}"
    ref = lambda: loss_bwd(linear_cross_entropy_reference(h, wt, labels))  # noqa: E731
    for chunk in (None, 4096) if not args.quick else (None,):
        label = f"chunk {chunk}" if chunk else "default chunk"
        _case(f"fused linear+CE {shape}, trained W, {label}",
              lambda: loss_bwd(fused_linear_cross_entropy(h, wt, labels, chunk_rows=chunk)), ref, [h, wt], rep=500)
    _case(f"fused linear+CE {shape}, trained W, PyTorch chunked CE",
          lambda: loss_bwd(fused_linear_cross_entropy(h, wt, labels, backend="torch")), ref, [h, wt], rep=500)
    wf = wt.detach()
    la = (torch.randn(16, hidden, device=dev) / hidden ** 0.5).requires_grad_()
    lb = (torch.randn(vocab, 16, device=dev) * 0.01).requires_grad_()
    _case(f"fused linear+CE {shape}, frozen W + LoRA r16",
          lambda: loss_bwd(fused_linear_cross_entropy(h, wf, labels, lora_A=la, lora_B=lb, lora_scaling=2.0)),
          lambda: loss_bwd(linear_cross_entropy_reference(h, wf, labels, la, lb, 2.0)), [h, la, lb], rep=500)
    _adamw8bit_cases(args.quick)
    _nf4_cases(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
