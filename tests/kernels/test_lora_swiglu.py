"""LoRA-SwiGLU kernel (LoRA B terms added per tile) vs the unfused arithmetic: p, dG, dU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpt_studio.kernels.lora_swiglu import (lora_swiglu_backward, lora_swiglu_forward,
                                            lora_swiglu_reference)
from kernel_cases import TOL, on_devices, rel_err

F32, BF16 = torch.float32, torch.bfloat16
# (rows, cols, rank, dtype): odd rows and columns (not multiples of the 64 x 64 tile), ranks
# below, at and between tl.dot's K of 16 (padded with masked loads)
CPU = [(6, 431, 4, F32), (42, 123, 16, BF16), (70, 64, 24, F32)]
GPU = [(4096, 14336, 16, BF16), (123, 431, 8, F32), (4097, 11008, 64, BF16)]


def _inputs(rows, cols, rank, dtype, dev):
    gen = torch.Generator().manual_seed(rows * cols + rank)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=dev, dtype=dtype)

    # LoRA terms about as large as the base outputs, so a wrong product cannot hide
    return (rand(rows, cols, scale=3), rand(rows, rank), rand(cols, rank, scale=0.3), 0.7,
            rand(rows, cols), rand(rows, rank), rand(cols, rank, scale=0.3), 1.5)


def _reference_grads(dp, yg, hg, bg, sg, yu, hu, bu, su):
    """dG, dU of silu(g) * u at the unfused path's g and u, by autograd in fp32."""
    g = torch.addmm(yg.float(), hg.float(), bg.float().t(), alpha=sg).to(yg.dtype).float()
    u = torch.addmm(yu.float(), hu.float(), bu.float().t(), alpha=su).to(yu.dtype).float()
    g.requires_grad_()
    u.requires_grad_()
    (F.silu(g) * u).backward(dp.float())
    return g.grad, u.grad


@pytest.mark.parametrize("dev,rows,cols,rank,dtype", on_devices(CPU, GPU), indirect=["dev"])
def test_lora_swiglu_matches_the_unfused_arithmetic(dev, rows, cols, rank, dtype):
    args = _inputs(rows, cols, rank, dtype, dev)
    p = lora_swiglu_forward(*args)
    ref = lora_swiglu_reference(*args)
    assert p.dtype == dtype and p.shape == (rows, cols)
    assert rel_err(p, ref) < TOL[dtype]
    dp = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    dg, du = lora_swiglu_backward(dp, *args)
    ref_dg, ref_du = _reference_grads(dp, *args)
    for name, got, want in (("dG", dg, ref_dg), ("dU", du, ref_du)):
        assert got.dtype == dtype and got.shape == (rows, cols)
        assert rel_err(got, want) < TOL[dtype], name


@pytest.mark.parametrize("dev", on_devices([()], [()]), indirect=["dev"])
def test_zero_lora_terms_give_plain_swiglu(dev):
    """With B = 0 the kernel is kernels/swiglu.py on the base outputs (bitwise: same rounding)."""
    from cpt_studio.kernels.swiglu import swiglu_forward

    yg, hg, bg, sg, yu, hu, bu, su = _inputs(33, 100, 16, F32, dev)
    bg, bu = torch.zeros_like(bg), torch.zeros_like(bu)
    p = lora_swiglu_forward(yg, hg, bg, sg, yu, hu, bu, su)
    assert torch.equal(p, swiglu_forward(yg, yu))


def test_output_dtype_can_differ_from_the_compute_dtype():
    """An fp32 residual stream under bf16 autocast: g and u rounded to bf16, p returned in fp32."""
    args = _inputs(8, 70, 16, BF16, "cpu")
    p = lora_swiglu_forward(*args, out_dtype=F32)
    assert p.dtype == F32
    # bf16 tolerance: Triton's interpreter truncates where CUDA rounds to nearest in the casts
    assert rel_err(p, lora_swiglu_reference(*args, out_dtype=F32)) < TOL[BF16]
