"""A LoRA projection on a 4-bit (bitsandbytes NF4 / FP4) base weight as one autograd function.

    y = lora_4bit_linear(x, packed, quant_state, bias, lora_A, lora_B, scaling, dtype)

stands in for bitsandbytes' Linear4bit.forward + MatMul4Bit + peft's casts, mm and add: per
projection 1 autograd node instead of 9 (10 in peft's forward), and on an H200 (bf16 autocast,
double-quant NF4, r16) 25 CUDA kernels per forward+backward instead of 30 (peft: 32) for a
4096x4096 projection over 4096 tokens, kernel time 542 instead of 562 us (peft: 630).
With s = scaling, dt = compute dtype, a = A.to(dt) [r, in], b = B.to(dt) [out, r],
W = dequantize(packed) [out, in]:
    forward:  h = x a^T                          [N, r]
              y = x W^T (+ bias) + s h b^T        [N, out]   (one GEMM, then addmm_ into it)
    backward: t  = dy b                           [N, r]
              dx = dy W + s t a                   [N, in]    (W dequantized again, then addmm_)
              dA = s t^T x                        [r, in]    one GEMM each, s in the epilogue; fp32
              dB = s dy^T h                       [out, r]   out on CUDA (no bf16 rounding, no cast)
Saved for backward: x, h, a, b; never W nor y (W costs 4 bits a weight to keep packed and one
dequantization to rebuild). Only the gradients in ctx.needs_input_grad are computed. y comes back
in x's dtype, as Linear4bit returns it; dA and dB in the LoRA weights' own dtypes.

skip_value=True is for a call whose output is backpropagated through but never read (the MLP's
down_proj in an offloaded checkpoint's recompute): it saves x and h as above and returns a zero
placeholder, skipping the dequantization, the base GEMM and the B GEMM.

The quant_state is bitsandbytes' QuantState, read duck-typed (quant_type, absmax, code, blocksize,
shape, nested, state2, offset); nothing here imports bitsandbytes. NF4 where Triton runs is
dequantized by kernels/nf4_dequant.py; elsewhere by the `torch.ops.bitsandbytes` ops, which exist
because the quant_state came from bitsandbytes. The group of several projections of one x is
kernels/lora_4bit_group.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import use_triton
from .nf4_dequant import nf4_dequant


def dequantize_4bit_weight(packed: torch.Tensor, quant_state, dtype: torch.dtype,
                           backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """The [out, in] weight of a bnb 4-bit layer in `dtype` (what bnb.functional.dequantize_4bit
    computes in quant_state.dtype, here straight into `dtype`: no extra cast kernel).

    Double quantization (quant_state.nested): the per-block absmax is itself 8-bit, blockwise over
    state2; it is rebuilt in fp32 first (one kernel) and the offset added (one more), as bnb does.
    NF4 where Triton runs (CUDA; the interpreter in the CPU tests) takes one launch for all of it.
    `out`: a [out, in] matrix to write into (nf4_dequant's `out`: rows may lie further apart).
    """
    qs = quant_state
    if qs.quant_type == "nf4" and packed.dtype == torch.uint8 and use_triton(packed, backend):
        # one Triton launch instead of bitsandbytes' two (and the offset add): kernels/nf4_dequant.py
        nested = (qs.state2.absmax, qs.state2.code, qs.state2.blocksize, qs.offset) if qs.nested else None
        return nf4_dequant(packed, qs.code, qs.absmax, qs.blocksize, qs.shape, dtype, nested, out=out)
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, s2.absmax, s2.code,
                                                                     s2.blocksize, torch.float32)
        absmax += qs.offset
    w = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, qs.blocksize, qs.quant_type,
                                                       qs.shape, dtype)
    return w if out is None else out.copy_(w)


def scaled_product(m1: torch.Tensor, m2: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """alpha * m1 @ m2 in `dtype` (a LoRA weight's gradient), never rounded to a narrower dtype.

    One GEMM, alpha in its epilogue: addmm with beta=0 ignores its input (a 0-dim placeholder,
    never read). bf16/fp16 operands and an fp32 result on CUDA: out_dtype writes cuBLAS' fp32
    accumulator straight out (H200: 2 kernels, 37 us for [16, 4096] x [4096, 4096], against 4 and
    73 us for bf16 mm, cast, * alpha). Other devices have no such kernel: the product is rounded
    to the operands' dtype, then widened, which is what autograd gives through a cast.
    """
    if m1.dtype == dtype:
        return torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=alpha)
    if m1.is_cuda and dtype == torch.float32:
        return torch.addmm(m1.new_empty((), dtype=dtype), m1, m2, beta=0, alpha=alpha, out_dtype=dtype)
    return torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=alpha).to(dtype)


def without_autocast(backward, ctx, grad):
    """backward(ctx, grad) with autocast off on grad's device: backward() may be called inside an
    autocast region, and these hand-written backwards cast every GEMM operand themselves."""
    dev = grad.device.type
    if torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            return backward(ctx, grad)
    return backward(ctx, grad)


def base_output(xc: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, lead) -> tuple:
    """(y, y2): x W^T (+ bias) in xc's dtype, made in its final shape [*lead, out], and its 2-D
    view [N, out] to add the LoRA product into. Returned as a view, y could not be modified in
    place downstream (autograd forbids that for custom-function outputs that are views)."""
    y = torch.empty((*lead, w.shape[0]), dtype=xc.dtype, device=xc.device)
    y2 = y.view(-1, w.shape[0])                                           # [N, out]
    if bias is None:
        torch.mm(xc, w.t(), out=y2)
    else:
        torch.addmm(bias.to(xc.dtype), xc, w.t(), out=y2)
    return y, y2


class LoRA4bitLinearFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + scaling * (x A^T) B^T with W the dequantized 4-bit weight.

    Args of apply: those of lora_4bit_linear, in its order. x is flattened to [N, in] inside, so
    the flatten and the un-flatten add no autograd nodes. The body needs no autocast handling:
    every GEMM operand is cast to dtype first, so autocast (whose dtype is dtype when it is on)
    has nothing left to cast.
    """

    @staticmethod
    def forward(ctx, x, packed, quant_state, bias, lora_A, lora_B, scaling, dtype, skip_value=False,
                backend="auto"):
        lead = x.shape[:-1]
        xc = x.reshape(-1, x.shape[-1]).to(dtype)                         # [N, in]
        ctx.packed, ctx.quant_state, ctx.scaling, ctx.backend = packed, quant_state, scaling, backend
        ctx.dtypes, ctx.x_shape = (x.dtype, lora_A.dtype, lora_B.dtype), x.shape
        if skip_value:
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            ctx.save_for_backward(xc, torch.mm(xc, a.t()), a, b)
            # a zero broadcast to the output's shape: no allocation (the residual add makes one)
            return x.new_zeros(()).expand(*lead, quant_state.shape[0])
        w = dequantize_4bit_weight(packed, quant_state, dtype, backend)   # [out, in]
        y, y2 = base_output(xc, w, bias, lead)
        del w
        a, b = lora_A.to(dtype), lora_B.to(dtype)                         # [r, in], [out, r]
        h = torch.mm(xc, a.t())                                           # [N, r]
        y2.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(xc, h, a, b)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        return without_autocast(_lora_4bit_backward, ctx, dout)


def _lora_4bit_backward(ctx, dout):
    xc, h, a, b = ctx.saved_tensors
    x_dtype, a_dtype, b_dtype = ctx.dtypes
    need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
    s = ctx.scaling
    dout = dout.reshape(-1, dout.shape[-1]).to(a.dtype)                   # [N, out]
    dx = da = db = None
    t = torch.mm(dout, b) if need_x or need_a else None                    # [N, r]
    if need_x:
        w = dequantize_4bit_weight(ctx.packed, ctx.quant_state, a.dtype, ctx.backend)  # [out, in]
        dx = torch.mm(dout, w)                                             # [N, in]
        del w
        dx.addmm_(t, a, alpha=s)
        dx = dx.view(ctx.x_shape).to(x_dtype)
    if need_a:
        da = scaled_product(t.t(), xc, s, a_dtype)                         # [r, in]
    if need_b:
        db = scaled_product(dout.t(), h, s, b_dtype)                       # [out, r]
    return dx, None, None, None, da, db, None, None, None, None


def lora_4bit_linear(x: torch.Tensor, packed: torch.Tensor, quant_state, bias: torch.Tensor | None,
                     lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, dtype: torch.dtype,
                     skip_value: bool = False, backend: str = "auto") -> torch.Tensor:
    """x W^T (+ bias) + scaling * (x A^T) B^T, W the 4-bit weight; math in the module docstring.

    Args:
        x: [..., in], any float dtype; the result is [..., out] in x's dtype.
        packed, quant_state: the 4-bit weight's data and its bitsandbytes QuantState.
        bias: [out], frozen (no gradient is returned for it), or None.
        lora_A, lora_B: [r, in] and [out, r], the trained factors in any float dtype.
        scaling: the LoRA scaling s. dtype: the compute dtype (fp32, bf16 or fp16).
        skip_value: return a zero placeholder (not writable) and save only what the backward needs.
        backend: how W is dequantized: "auto" | "triton" | "torch" (NF4 only; FP4 always torch).
    """
    return LoRA4bitLinearFunction.apply(x, packed, quant_state, bias, lora_A, lora_B, scaling, dtype,
                                        skip_value, backend)


def lora_4bit_linear_reference(x: torch.Tensor, packed: torch.Tensor, quant_state,
                               bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                               scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """Pure PyTorch with ordinary autograd: the weight dequantized by bitsandbytes' own ops, then
    F.linear (+bias) + scaling * (x A^T) B^T, every operand cast to `dtype`, the result to x's."""
    w = dequantize_4bit_weight(packed, quant_state, dtype, backend="torch")
    xc = x.to(dtype)
    y = F.linear(xc, w, None if bias is None else bias.to(dtype))
    return (y + scaling * F.linear(F.linear(xc, lora_A.to(dtype)), lora_B.to(dtype))).to(x.dtype)
