"""SwiGLU gate of the Llama MLP, silu(gate) * up, fused into one Triton pass.

Forward (fp32 math, rounded like transformers' act_fn(gate) * up in the input dtype):
    s = sigmoid(g),  a = g * s  (= silu(g), rounded to g.dtype),  y = a * u

Backward: nothing is stored beyond the inputs g and u; silu is recomputed from g.
    dU = dy * silu(g)
    dG = dy * u * silu'(g),   silu'(g) = s * (1 + g * (1 - s))

The kernel is elementwise over the flattened tensors (blocks of 1024 elements), so any shape
works; the backward writes fresh dG and dU rather than overwriting g and u, because other
autograd nodes (a LoRA-wrapped projection, gradient checkpointing) may still hold them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import TRITON_AVAILABLE, tl, triton, use_triton

_BLOCK = 1024

if TRITON_AVAILABLE:

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, n_elements, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        a = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)
        tl.store(Y + offs, (a * u).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(DY, G, U, DG, DU, n_elements, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        a = g * s
        tl.store(DU + offs, (dy * a).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launches the forward kernel over contiguous gate and up of one shape and dtype."""
    y = torch.empty_like(gate)
    n = gate.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, y, n, BLOCK=_BLOCK, num_warps=4)
    return y


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Launches the backward kernel. Returns (dgate, dup)."""
    dy = dy.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dy, gate, up, dgate, dup, n, BLOCK=_BLOCK, num_warps=4)
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton SwiGLU; saves only gate and up."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy, gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure PyTorch, the same arithmetic as transformers' LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up; Triton where it can run (see dispatch.use_triton)."""
    if not use_triton(gate, backend) or gate.shape != up.shape or gate.dtype != up.dtype:
        return swiglu_reference(gate, up)  # mixed shapes/dtypes broadcast and promote in PyTorch
    return SwiGLUFunction.apply(gate, up)
