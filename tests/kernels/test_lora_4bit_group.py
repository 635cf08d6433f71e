"""Several 4-bit LoRA projections of one x as one function: the same as one call each, and as the
reference; unused outputs and frozen factors get no gradient."""
from __future__ import annotations

import pytest
import torch

from cpt_studio.kernels.lora_4bit import lora_4bit_linear
from cpt_studio.kernels.lora_4bit_group import lora_4bit_group, lora_4bit_group_reference
from kernel_cases import TOL, on_devices, rel_err
from test_lora_4bit import _quantized, count_dequantize  # noqa: F401  (a fixture)

F32, BF16 = torch.float32, torch.bfloat16
# (lead shape of x, in, [(out, r, bias, quant_type, nested) per member], compute dtype)
QKV = [(96, 4, True, "nf4", True), (32, 4, False, "nf4", False), (32, 4, False, "fp4", True)]
CPU = [((2, 3), 64, QKV, F32), ((5,), 128, [(64, 3, False, "nf4", True), (64, 3, True, "nf4", True)], BF16),
       ((4,), 64, [(48, 2, False, "nf4", True)], F32)]
GPU = [((2, 37), 256, [(256, 16, False, "nf4", True), (64, 16, False, "nf4", True),
                       (64, 16, False, "nf4", True)], BF16), ((9,), 128, QKV, F32)]


def _members(dev, in_f, specs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    members = []
    for i, (out_f, r, bias, quant_type, nested) in enumerate(specs):
        packed, qs = _quantized(out_f, in_f, quant_type, nested, dev, seed + i)
        a = (torch.randn(r, in_f, generator=gen) * 0.2).to(dev).requires_grad_()
        b = (torch.randn(out_f, r, generator=gen) * 0.2).to(dev).requires_grad_()
        bias_t = (torch.randn(out_f, generator=gen) * 0.1).to(dev) if bias else None
        members.append((packed, qs, bias_t, a, b))
    return members


def _run(fn, x, members, dys):
    """The outputs and the gradients of x and of every trained factor for the given output grads."""
    ys = fn(x, members)
    leaves = [x] + [t for m in members for t in (m[3], m[4]) if t.requires_grad]
    used = [(y, dy) for y, dy in zip(ys, dys) if dy is not None]
    grads = torch.autograd.grad([y for y, _ in used], leaves, [dy for _, dy in used], allow_unused=True)
    return list(ys), list(grads)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dev,lead,in_f,specs,dtype", on_devices(CPU, GPU), indirect=["dev"])
def test_group_is_one_call_each_and_the_reference(dev, lead, in_f, specs, dtype, backend):
    members = _members(dev, in_f, specs)
    x = torch.randn(*lead, in_f, generator=torch.Generator().manual_seed(7)).to(dev).requires_grad_()
    gen = torch.Generator().manual_seed(8)
    dys = [torch.randn(*lead, s[0], generator=gen).to(dev) for s in specs]
    got = _run(lambda x_, ms: lora_4bit_group(x_, ms, 1.5, dtype, backend), x, members, dys)
    single = _run(lambda x_, ms: [lora_4bit_linear(x_, *m, 1.5, dtype, backend=backend) for m in ms],
                  x, members, dys)
    ref = _run(lambda x_, ms: lora_4bit_group_reference(x_, ms, 1.5, dtype), x, members, dys)
    for g, s, want in zip(got[0] + got[1], single[0] + single[1], ref[0] + ref[1]):
        assert g.dtype == s.dtype and g.shape == s.shape
        # one call each and the group differ in summation order only (and, in bf16, rounding)
        assert rel_err(g, s) < (1e-6 if dtype == F32 else TOL[dtype])
        assert rel_err(g, want) < TOL[dtype]


def test_unused_outputs_and_frozen_factors_get_no_gradient(count_dequantize):
    """Only the first output is used, the second's B is frozen: the first's factors and x get the
    single call's gradients; the others' B none, their A zero rows; x's dx needs one weight only."""
    members = _members("cpu", 64, QKV)
    members[1][4].requires_grad_(False)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    dy = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(5))
    _, grads = _run(lambda x_, ms: lora_4bit_group(x_, ms, 2.0, F32, "torch"), x, members, [dy, None, None])
    assert len(count_dequantize) == 3 + 1   # the forward's three weights, then the first's for dx
    _, want = _run(lambda x_, ms: [lora_4bit_linear(x_, *ms[0], 2.0, F32, backend="torch")],
                   x, members[:1], [dy])
    dx, (a0, b0, a1, a2, b2) = grads[0], grads[1:]
    assert rel_err(dx, want[0]) < 1e-6 and rel_err(a0, want[1]) < 1e-6 and rel_err(b0, want[2]) < 1e-6
    assert torch.count_nonzero(a1) == 0 and torch.count_nonzero(a2) == 0
    assert b2 is None


def test_no_output_with_a_gradient_and_x_without_one():
    members = _members("cpu", 64, QKV[:2])
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(6))   # the first layer's input
    ys = lora_4bit_group(x, members, 2.0, F32, "torch")
    ref = lora_4bit_group_reference(x, members, 2.0, F32)
    for y, want in zip(ys, ref):
        assert rel_err(y, want) < 1e-6
    (ys[1] * 0).sum().backward()   # only the second carries a (zero) gradient
    assert members[0][4].grad is None and torch.count_nonzero(members[1][4].grad) == 0


def test_factors_of_several_dtypes_are_refused():
    members = _members("cpu", 64, QKV[:2])
    members[1] = (*members[1][:3], members[1][3].detach().to(BF16), members[1][4])
    with pytest.raises(ValueError, match="one dtype"):
        lora_4bit_group(torch.randn(3, 64), members, 1.0, F32)
    with pytest.raises(ValueError, match="at least one"):
        lora_4bit_group(torch.randn(3, 64), [], 1.0, F32)
