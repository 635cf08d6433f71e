"""Several 4-bit LoRA projections of one input (an attention's q/k/v, an MLP's gate/up) as one
autograd function.

    q, k, v = lora_4bit_group(x, [(packed, quant_state, bias, lora_A, lora_B), ...], scaling, dtype)

Run apart (kernels/lora_4bit.py each), every projection reads x for its own x A^T, casts its own
A, reads x again for its dA, adds its own s t A into its own dx, and autograd then sums the dx of
the members (two full-size adds for three). As one function with A = [A_1; A_2; A_3] (rows
stacked, [R, in]):
    forward:  h = x A^T                     [N, R]   one GEMM, x read once
              y_i = x W_i^T (+ b_i) + s h_i B_i^T    (h_i: h's columns of member i)
                  = [x | h] [W_i | s B_i^(i)]^T       one GEMM of inner size in + R, no add
    where B_i^(i) is B_i in member i's columns of h and zeros elsewhere: the weight is dequantized
    straight into the left part of a [out_i, in + R] buffer (R padded to a multiple of 16 with
    zero columns), so y_i is written once instead of written and then read and written again by a
    separate add of the LoRA term (on a Llama-8B layer's gate/up at 2 x 2048 tokens, 235 MB read
    and written less per pass, for 0.4-1.2% more GEMM work). [x | h] is what the backward keeps.
    backward: t_i = dy_i B_i, T = [t_1 | t_2 | t_3]  [N, R]
              dx = sum_i dy_i W_i + s T A             (addmm_ into one buffer, no adds)
              dA = s T^T x                  [R, in]  one GEMM, x read once; dA_i its rows
              dB_i = s dy_i^T h_i
Per Llama layer and step (forward, recompute, backward) that is 15 fewer kernel launches, 3 fewer
autograd nodes a pass, and (Llama-8B, 2 x 2048 tokens) ~0.8 GB less memory traffic. An output
that carries no gradient gets none computed (its dB is None, its rows of dA zero).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import lora_4bit   # dequantize_4bit_weight through the module: one place to watch it
from .lora_4bit import base_output, lora_4bit_linear_reference, scaled_product, without_autocast

_ALIGN = 16   # xh's and each [W | B] buffer's row length, padded with zeros to a multiple of this


class LoRA4bitGroupFunction(torch.autograd.Function):
    """y_1..y_n = x W_i^T (+ b_i) + s (x A_i^T) B_i^T for n 4-bit LoRA projections of one x.

    Args of apply: x [..., in], dtype (compute), scaling (shared), n, backend, then per member
    packed, quant_state, bias (frozen) or None, lora_A [r_i, in], lora_B [out_i, r_i]. Returns n
    tensors [..., out_i] in x's dtype. Saved: [x | h] (one buffer), A (stacked) and the B_i in
    dtype, never a weight or an output.
    """

    @staticmethod
    def forward(ctx, x, dtype, scaling, n, backend, *flat):
        members = [flat[5 * i:5 * i + 5] for i in range(n)]
        lead, k = x.shape[:-1], x.shape[-1]
        a = torch.cat([m[3] for m in members]).to(dtype)                       # [R, in]
        bs = [m[4].to(dtype) for m in members]                                 # [out_i, r_i]
        r_all = a.shape[0]
        width = k + -(-r_all // _ALIGN) * _ALIGN                               # in + R, aligned
        # xh = [x | h | 0]: each output is then one GEMM, xh [W_i | s B_i in h_i's columns]^T
        xh = torch.empty((x.numel() // k, width), dtype=dtype, device=x.device)
        xc = xh[:, :k]
        xc.copy_(x.reshape(-1, k))                                             # [N, in]
        xh[:, k:k + r_all] = torch.mm(xc, a.t())                               # h [N, R]
        xh[:, k + r_all:].zero_()
        outputs, start = [], 0
        for (packed, qs, bias, lora_a, _), b in zip(members, bs):
            r = lora_a.shape[0]
            wb = torch.empty((b.shape[0], width), dtype=dtype, device=x.device)
            lora_4bit.dequantize_4bit_weight(packed, qs, dtype, backend, out=wb[:, :k])
            wb[:, k:].zero_()
            torch.mul(b, scaling, out=wb[:, k + start:k + start + r])
            y, _ = base_output(xh, wb, bias, lead)
            del wb
            start += r
            outputs.append(y.to(x.dtype))
        ctx.members = [(packed, qs, lora_a.shape[0], lora_a.dtype, lora_b.dtype)
                       for packed, qs, _, lora_a, lora_b in members]
        ctx.scaling, ctx.x_meta, ctx.backend = scaling, (x.dtype, x.shape), backend
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(xh, a, *bs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *douts):
        some = next((d for d in douts if d is not None), None)
        if some is None:   # no output carried a gradient
            return (None,) * (5 + 5 * len(ctx.members))
        return without_autocast(lambda c, _: _group_backward(c, douts), ctx, some)


def _group_backward(ctx, douts):
    xh, a, *bs = ctx.saved_tensors
    k = ctx.x_meta[1][-1]
    xc, h = xh[:, :k], xh[:, k:k + a.shape[0]]
    s, (x_dtype, x_shape) = ctx.scaling, ctx.x_meta
    needs = ctx.needs_input_grad
    n = len(ctx.members)
    need_x = needs[0]
    need_a = [needs[5 + 5 * i + 3] for i in range(n)]
    need_b = [needs[5 + 5 * i + 4] for i in range(n)]
    dys = [d.reshape(-1, d.shape[-1]).to(a.dtype) if d is not None else None for d in douts]
    ts = [torch.mm(dy, b) if dy is not None else h.new_zeros(h.shape[0], b.shape[1])
          for dy, b in zip(dys, bs)]
    t = torch.cat(ts, dim=1) if n > 1 else ts[0]                             # [N, R]
    dx = None
    if need_x:
        for dy, (packed, qs, *_rest) in zip(dys, ctx.members):
            if dy is None:
                continue
            w = lora_4bit.dequantize_4bit_weight(packed, qs, a.dtype, ctx.backend)
            dx = torch.mm(dy, w) if dx is None else dx.addmm_(dy, w)
            del w
        if dx is None:
            dx = torch.zeros_like(xc)
        dx.addmm_(t, a, alpha=s)
        dx = dx.view(x_shape).to(x_dtype)
    grads_a = [None] * n
    if any(need_a):
        da = scaled_product(t.t(), xc, s, ctx.members[0][3])                 # [R, in]
        grads_a = list(da.split([m[2] for m in ctx.members]))
    grads, start = [], 0
    for i, (dy, member) in enumerate(zip(dys, ctx.members)):
        r = member[2]
        db = scaled_product(dy.t(), h[:, start:start + r], s, member[4]) \
            if need_b[i] and dy is not None else None
        start += r
        grads += [None, None, None, grads_a[i] if need_a[i] else None, db]
    return (dx, None, None, None, None, *grads)


def lora_4bit_group(x: torch.Tensor, members: Sequence[tuple], scaling: float, dtype: torch.dtype,
                    backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """lora_4bit_linear(x, *member, scaling, dtype) for each member, computed as one function.

    Args:
        x: [..., in]; each output is [..., out_i] in x's dtype.
        members: (packed, quant_state, bias or None, lora_A [r_i, in], lora_B [out_i, r_i]) each;
            all lora_A of one dtype and all lora_B of one dtype (dA is computed as one tensor).
        scaling: the LoRA scaling, shared. dtype: the compute dtype.
        backend: how the weights are dequantized: "auto" | "triton" | "torch".

    Raises:
        ValueError: no members, or LoRA factors of several dtypes.
    """
    if not members:
        raise ValueError("lora_4bit_group needs at least one projection")
    if len({m[3].dtype for m in members}) > 1 or len({m[4].dtype for m in members}) > 1:
        raise ValueError("lora_4bit_group needs every member's lora_A in one dtype and every "
                         "lora_B in one dtype; call lora_4bit_linear for each instead")
    flat = [t for m in members for t in m]
    return LoRA4bitGroupFunction.apply(x, dtype, scaling, len(members), backend, *flat)


def lora_4bit_group_reference(x: torch.Tensor, members: Sequence[tuple], scaling: float,
                              dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Pure PyTorch with ordinary autograd: lora_4bit_linear_reference for each member."""
    return tuple(lora_4bit_linear_reference(x, *m, scaling, dtype) for m in members)
