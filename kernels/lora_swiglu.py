"""SwiGLU of two LoRA projections whose low-rank terms are added inside the kernel.

With the base outputs yg = x Wg^T, yu = x Wu^T [N, I], the LoRA activations hg = x Ag^T,
hu = x Au^T [N, r], the LoRA B weights bg, bu [I, r] and scalings sg, su:
    g = round(yg + sg * hg bg^T),  u = round(yu + su * hu bu^T)     (round: to yg's dtype)
    forward:  p = round(silu(g)) * u
    backward: dU = dp * silu(g),  dG = dp * u * silu'(g)
which is what the unfused path computes: each projection adds its LoRA term into its bf16 output
(one addmm_ with beta=1, a read and a write of [N, I] per projection), then kernels/swiglu.py.
Here the [BM, r] x [r, BN] products are computed per tile (fp32, IEEE), so g and u never exist in
memory: the two full-size adds per forward are gone, and the backward recomputes g and u from
the same saved tensors (yg, yu, hg, hu; not g and u: the same bytes).

Tiles of [BM, BN] over [N, I]; r is padded to a power of two >= 16 (tl.dot's smallest K) with
masked loads. All inputs contiguous.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import TRITON_AVAILABLE, tl, triton

_BM, _BN = 64, 64

if TRITON_AVAILABLE:

    @triton.jit
    def _lora_term(Y, H, B, scale, rows, cols, ks, offs, mask, r, n_rows, n_cols):
        """round(y + scale * h b^T) on one [BM, BN] tile, in fp32."""
        h = tl.load(H + rows[:, None].to(tl.int64) * r + ks[None, :],
                    mask=(rows[:, None] < n_rows) & (ks[None, :] < r), other=0.0).to(tl.float32)
        b = tl.load(B + cols[:, None].to(tl.int64) * r + ks[None, :],
                    mask=(cols[:, None] < n_cols) & (ks[None, :] < r), other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        y = y + scale * tl.dot(h, tl.trans(b), input_precision="ieee")
        return y.to(Y.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _tile_g_and_u(YG, HG, BG, YU, HU, BU, n_rows, n_cols, r, sg, su,
                      BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr):
        """This program's tile: (g, u, offsets, mask)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        ks = tl.arange(0, R)
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        g = _lora_term(YG, HG, BG, sg, rows, cols, ks, offs, mask, r, n_rows, n_cols)
        u = _lora_term(YU, HU, BU, su, rows, cols, ks, offs, mask, r, n_rows, n_cols)
        return g, u, offs, mask

    @triton.jit
    def _lora_swiglu_fwd_kernel(YG, HG, BG, YU, HU, BU, P, n_rows, n_cols, r, sg, su,
                                BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr):
        g, u, offs, mask = _tile_g_and_u(YG, HG, BG, YU, HU, BU, n_rows, n_cols, r, sg, su, BM, BN, R)
        a = (g * tl.sigmoid(g)).to(YG.dtype.element_ty).to(tl.float32)
        tl.store(P + offs, (a * u).to(P.dtype.element_ty), mask=mask)

    @triton.jit
    def _lora_swiglu_bwd_kernel(DP, YG, HG, BG, YU, HU, BU, DG, DU, n_rows, n_cols, r, sg, su,
                                BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr):
        g, u, offs, mask = _tile_g_and_u(YG, HG, BG, YU, HU, BU, n_rows, n_cols, r, sg, su, BM, BN, R)
        dp = tl.load(DP + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(DU + offs, (dp * g * s).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dp * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


def _padded_rank(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _grid(n_rows: int, n_cols: int):
    return (triton.cdiv(n_rows, _BM), triton.cdiv(n_cols, _BN))


def lora_swiglu_forward(yg, hg, bg, sg: float, yu, hu, bu, su: float, out_dtype=None) -> torch.Tensor:
    """p [N, I] (out_dtype, default yg's) from contiguous yg, yu [N, I], hg, hu [N, r], bg, bu [I, r]."""
    n_rows, n_cols = yg.shape
    p = torch.empty((n_rows, n_cols), dtype=out_dtype or yg.dtype, device=yg.device)
    r = hg.shape[1]
    _lora_swiglu_fwd_kernel[_grid(n_rows, n_cols)](
        yg, hg, bg, yu, hu, bu, p, n_rows, n_cols, r, float(sg), float(su),
        BM=_BM, BN=_BN, R=_padded_rank(r), num_warps=4)
    return p


def lora_swiglu_backward(dp, yg, hg, bg, sg: float, yu, hu, bu, su: float):
    """(dG, dU) [N, I] in yg's dtype: the gradients of g and u (LoRA terms included)."""
    n_rows, n_cols = yg.shape
    dp = dp.contiguous()
    dg, du = torch.empty_like(yg), torch.empty_like(yu)
    r = hg.shape[1]
    _lora_swiglu_bwd_kernel[_grid(n_rows, n_cols)](
        dp, yg, hg, bg, yu, hu, bu, dg, du, n_rows, n_cols, r, float(sg), float(su),
        BM=_BM, BN=_BN, R=_padded_rank(r), num_warps=4)
    return dg, du


def lora_swiglu_reference(yg, hg, bg, sg: float, yu, hu, bu, su: float, out_dtype=None):
    """Pure PyTorch, the unfused path's arithmetic: each LoRA term added into its output
    (rounded to yg's dtype), then silu(g) rounded, times u."""
    g = torch.addmm(yg.float(), hg.float(), bg.float().t(), alpha=sg).to(yg.dtype)
    u = torch.addmm(yu.float(), hu.float(), bu.float().t(), alpha=su).to(yu.dtype)
    p = F.silu(g.float()).to(yg.dtype).float() * u.float()
    return p.to(out_dtype or yg.dtype)
