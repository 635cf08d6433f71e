"""Rotary position embedding on q and k in one Triton launch (transformers' rotate_half convention).

With x = [x1, x2] split in halves of the head dim D, and cos = [c1, c2], sin = [s1, s2]
(transformers builds cos = cat(freqs, freqs).cos(), so c1 == c2 and s1 == s2; the kernel does not
rely on it):
    forward:  y = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2, x1]
              y1 = x1 * c1 - x2 * s1
              y2 = x2 * c2 + x1 * s2
The map is linear in x, so the backward is its transpose, a rotation by -theta:
              dx1 = dy1 * c1 + dy2 * s2
              dx2 = dy2 * c2 - dy1 * s1
cos and sin take no gradient (they come from positions).

The backward is the same kernel with BACKWARD=True (one kernel, two rotations).
One program handles one (batch, position) pair: it loads that position's cos/sin once and
rotates every q head and every k head there. q and k may be strided views (transformers passes
`proj(x).view(B, S, H, D).transpose(1, 2)`); only the last dim must be contiguous. Outputs are new
tensors with the inputs' strides, so the op is autograd-safe (nothing is rotated in place).
"""
from __future__ import annotations

import torch

from .dispatch import TRITON_AVAILABLE, tl, triton, use_triton

if TRITON_AVAILABLE:

    @triton.jit
    def _rotate_heads(X, OUT, base, stride_h, n_heads, c1, c2, s1, s2, half,
                      BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        heads = tl.arange(0, BLOCK_H)
        cols = tl.arange(0, BLOCK_HALF)
        mask = (heads[:, None] < n_heads) & (cols[None, :] < half)
        offs = base + heads[:, None].to(tl.int64) * stride_h + cols[None, :]
        x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + offs + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(OUT + offs, y1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + offs + half, y2.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_fwd_kernel(Q, K, QO, KO, COS, SIN, q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, c_sb, c_ss,
                         seq_len, n_qh, n_kh, half, BACKWARD: tl.constexpr,
                         BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr):
        pid = tl.program_id(0)
        b = (pid // seq_len).to(tl.int64)
        s = (pid % seq_len).to(tl.int64)
        cols = tl.arange(0, BLOCK_HALF)
        cmask = cols < half
        c_off = b * c_sb + s * c_ss + cols
        c1 = tl.load(COS + c_off, mask=cmask, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(COS + c_off + half, mask=cmask, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(SIN + c_off, mask=cmask, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(SIN + c_off + half, mask=cmask, other=0.0).to(tl.float32)[None, :]
        _rotate_heads(Q, QO, b * q_sb + s * q_ss, q_sh, n_qh, c1, c2, s1, s2, half,
                      BACKWARD, BLOCK_QH, BLOCK_HALF)
        _rotate_heads(K, KO, b * k_sb + s * k_ss, k_sh, n_kh, c1, c2, s1, s2, half,
                      BACKWARD, BLOCK_KH, BLOCK_HALF)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rope_launch(q, k, cos, sin, backward: bool):
    """q [B, Hq, S, D], k [B, Hk, S, D], cos/sin [B or 1, S, D]. Returns rotated (q, k)."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    batch, n_qh, seq_len, head_dim = q.shape
    n_kh = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # same strides as q, k (preserve_format)
    if qo.stride() != q.stride() or ko.stride() != k.stride():
        q, k = q.contiguous(), k.contiguous()
        qo, ko = torch.empty_like(q), torch.empty_like(k)
    half = head_dim // 2
    c_sb = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rope_fwd_kernel[(batch * seq_len,)](
        q, k, qo, ko, cos, sin, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        c_sb, cos.stride(1), seq_len, n_qh, n_kh, half, BACKWARD=backward,
        BLOCK_QH=triton.next_power_of_2(n_qh), BLOCK_KH=triton.next_power_of_2(n_kh),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4)
    return qo, ko


def rope_forward(q, k, cos, sin):
    """Rotates q and k by theta (one launch)."""
    return _rope_launch(q, k, cos, sin, backward=False)


def rope_backward(dq, dk, cos, sin):
    """Rotates the output gradients by -theta (one launch)."""
    return _rope_launch(dq, dk, cos, sin, backward=True)


class RopeFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton RoPE for q, k laid out [B, H, S, D]; saves only cos and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors  # dq, dk arrive materialised (zeros when unused)
        dq, dk = rope_backward(dq, dk, cos, sin)
        return dq, dk, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Pure PyTorch, the same arithmetic as transformers' apply_rotary_pos_emb."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(q, k, cos, sin, unsqueeze_dim: int = 1, backend: str = "auto"):
    """Drop-in for transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim).

    unsqueeze_dim=1: q, k are [B, H, S, D]; unsqueeze_dim=2: q, k are [B, S, H, D].
    cos, sin are [B or 1, S, D].
    """
    if not use_triton(q, backend) or q.shape[-1] % 2 or cos.dim() != 3 or q.dtype != k.dtype:
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 2:
        qo, ko = RopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    return RopeFunction.apply(q, k, cos, sin)
