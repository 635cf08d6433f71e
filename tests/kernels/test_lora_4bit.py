"""The fused 4-bit LoRA functions vs their pure-PyTorch references: y, dx, dA, dB.

The weights are quantized by bitsandbytes itself (NF4 / FP4, with and without double
quantization). backend="triton" dequantizes NF4 with kernels/nf4_dequant.py (Triton's interpreter
on CPU), backend="torch" with bitsandbytes' ops; the references always take the latter.
"""
from __future__ import annotations

import bitsandbytes.functional as bnb_functional   # a dependency (pyproject): no skip without it
import pytest
import torch

from cpt_studio.kernels import lora_4bit
from cpt_studio.kernels.lora_4bit import (dequantize_4bit_weight, lora_4bit_linear,
                                          lora_4bit_linear_reference)
from cpt_studio.kernels.lora_4bit_group import lora_4bit_group, lora_4bit_group_reference
from kernel_cases import TOL, on_devices, rel_err

F32, BF16 = torch.float32, torch.bfloat16
# (lead shape of x, in, out, r, bias, quant_type, nested, compute dtype)
CPU = [((2, 3), 64, 96, 4, True, "nf4", True, F32), ((5,), 128, 64, 3, False, "nf4", False, BF16),
       ((7,), 64, 32, 8, False, "fp4", True, F32), ((1, 6), 64, 96, 4, True, "fp4", False, BF16)]
GPU = [((2, 37), 256, 384, 16, True, "nf4", True, BF16), ((37,), 192, 128, 3, False, "nf4", False, F32),
       ((4, 9), 128, 256, 8, True, "fp4", True, BF16)]


def _quantized(out_f, in_f, quant_type, nested, dev, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.1
    return bnb_functional.quantize_4bit(w.to(dev), blocksize=64, quant_type=quant_type,
                                        compress_statistics=nested)


def _projection(dev, lead, in_f, out_f, r, bias, quant_type, nested, seed=0):
    """(x, (packed, quant_state, bias, lora_A, lora_B)): fp32 x and LoRA masters, as in training."""
    packed, qs = _quantized(out_f, in_f, quant_type, nested, dev, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, in_f, generator=gen).to(dev).requires_grad_()
    a = (torch.randn(r, in_f, generator=gen) * 0.2).to(dev).requires_grad_()
    b = (torch.randn(out_f, r, generator=gen) * 0.2).to(dev).requires_grad_()
    bias_t = (torch.randn(out_f, generator=gen) * 0.1).to(dev) if bias else None
    return x, (packed, qs, bias_t, a, b)


def _value_and_grads(fn, x, member, dy, *args, **kwargs):
    y = fn(x, *member, *args, **kwargs)
    leaves = [t for t in (x, member[3], member[4]) if t.requires_grad]
    return (y, *torch.autograd.grad(y, leaves, dy))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dev,lead,in_f,out_f,r,bias,quant_type,nested,dtype", on_devices(CPU, GPU),
                         indirect=["dev"])
def test_linear_matches_the_reference(dev, lead, in_f, out_f, r, bias, quant_type, nested, dtype, backend):
    x, member = _projection(dev, lead, in_f, out_f, r, bias, quant_type, nested)
    dy = torch.randn(*lead, out_f, generator=torch.Generator().manual_seed(9)).to(dev)
    got = _value_and_grads(lora_4bit_linear, x, member, dy, 1.5, dtype, backend=backend)
    ref = _value_and_grads(lora_4bit_linear_reference, x, member, dy, 1.5, dtype)
    for name, g, want, like in zip(("y", "dx", "dA", "dB"), got, ref, (x, x, member[3], member[4])):
        assert g.dtype == like.dtype and g.shape == want.shape, name   # y in x's dtype, fp32 grads
        assert rel_err(g, want) < TOL[dtype], name


def test_the_reference_is_the_float64_formula():
    """Guards the reference itself: y = x W^T + b + s (x A^T) B^T with W as bitsandbytes dequantizes it."""
    x, (packed, qs, bias, a, b) = _projection("cpu", (6,), 64, 96, 4, True, "nf4", True)
    w = bnb_functional.dequantize_4bit(packed, qs).double()
    want = x.double() @ w.t() + bias.double() + 1.5 * (x.double() @ a.double().t()) @ b.double().t()
    assert rel_err(lora_4bit_linear_reference(x, packed, qs, bias, a, b, 1.5, F32), want) < 1e-6
    assert rel_err(lora_4bit_linear(x, packed, qs, bias, a, b, 1.5, F32, backend="torch"), want) < 1e-6


@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("nf4", True), ("fp4", True)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dev", on_devices([()], [()]), indirect=["dev"])
def test_dequantize_gives_bitsandbytes_weight(dev, quant_type, nested, backend):
    packed, qs = _quantized(96, 64, quant_type, nested, dev)
    got = dequantize_4bit_weight(packed, qs, BF16, backend)
    assert got.dtype == BF16 and got.shape == (96, 64)
    assert torch.equal(got, bnb_functional.dequantize_4bit(packed, qs).to(BF16))


@pytest.fixture
def count_dequantize(monkeypatch):
    """A list that gets one entry per weight dequantization, through the one module-level name."""
    calls = []
    original = lora_4bit.dequantize_4bit_weight
    monkeypatch.setattr(lora_4bit, "dequantize_4bit_weight",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("frozen", [("x",), ("a",), ("b",), ("x", "a")])
def test_only_the_gradients_asked_for_are_computed(frozen, count_dequantize):
    x, member = _projection("cpu", (6,), 64, 96, 4, False, "nf4", True)
    named = {"x": x, "a": member[3], "b": member[4]}
    for name in frozen:
        named[name].requires_grad_(False)
    dy = torch.randn(6, 96, generator=torch.Generator().manual_seed(3))
    ref = _value_and_grads(lora_4bit_linear_reference, x, member, dy, 2.0, F32)
    count_dequantize.clear()
    got = _value_and_grads(lora_4bit_linear, x, member, dy, 2.0, F32, backend="torch")
    assert len(got) == 4 - len(frozen)
    for g, want in zip(got, ref):
        assert rel_err(g, want) < 1e-5
    # the forward dequantizes once; the backward once more only for dx
    assert len(count_dequantize) == (1 if "x" in frozen else 2)
    if "x" in frozen:
        assert got[0].grad_fn.next_functions[0][0] is None   # nothing flows into x


def test_skip_value_saves_what_the_backward_needs_and_gives_the_same_gradients(count_dequantize):
    x, member = _projection("cpu", (2, 3), 64, 96, 4, True, "nf4", True)
    dy = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(4))
    full = lora_4bit_linear(x, *member, 1.5, BF16, backend="torch")
    count_dequantize.clear()
    skipped = lora_4bit_linear(x, *member, 1.5, BF16, skip_value=True, backend="torch")
    assert count_dequantize == []   # no weight, no base GEMM
    assert skipped.shape == full.shape and skipped.dtype == x.dtype and not skipped.any()
    with pytest.raises(RuntimeError):   # a broadcast placeholder, not a tensor to write into
        skipped.add_(1.0)
    saved = zip(full.grad_fn.saved_tensors, skipped.grad_fn.saved_tensors)
    assert all(torch.equal(f, s) for f, s in saved)
    leaves = [x, member[3], member[4]]
    for f, s in zip(torch.autograd.grad(full, leaves, dy), torch.autograd.grad(skipped, leaves, dy)):
        assert torch.equal(f, s)


def test_saves_no_weight_and_no_output_and_returns_no_view():
    """Only x, h [N, r] and the cast LoRA factors are kept; [B, T, in] in, [B, T, out] out, not a
    view: an in-place op downstream (a residual `+=`) works, as on peft's output."""
    x, member = _projection("cpu", (2, 3), 64, 96, 4, False, "nf4", True)
    y = lora_4bit_linear(x, *member, 2.0, F32, backend="torch")
    assert sorted(tuple(t.shape) for t in y.grad_fn.saved_tensors) == [(4, 64), (6, 4), (6, 64), (96, 4)]
    assert y.shape == (2, 3, 96) and not y._is_view()
    y.mul_(3).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (lora_4bit_linear_reference(x_ref, *member, 2.0, F32) * 3).sum().backward()
    assert rel_err(x.grad, x_ref.grad) < 1e-6


def test_under_autocast_the_same_as_without():
    """The backward runs with autocast off (every operand is cast by hand): bitwise the same."""
    x, member = _projection("cpu", (6,), 64, 96, 4, True, "nf4", True)
    dy = torch.randn(6, 96, generator=torch.Generator().manual_seed(5))
    plain = _value_and_grads(lora_4bit_linear, x, member, dy, 1.5, BF16, backend="torch")
    with torch.autocast("cpu", dtype=BF16):
        cast = _value_and_grads(lora_4bit_linear, x, member, dy, 1.5, BF16, backend="torch")
    assert all(torch.equal(p, c) for p, c in zip(plain, cast))
