"""SwiGLU kernel vs the PyTorch reference silu(gate) * up: y, dGate, dUp."""
from __future__ import annotations

import pytest
import torch

from cpt_studio.kernels.swiglu import SwiGLUFunction, swiglu, swiglu_reference
from kernel_cases import TOL, on_devices, rel_err

F32, BF16 = torch.float32, torch.bfloat16
CPU = [(6, 431, F32), (42, 123, BF16), (2 * 21, 64, F32)]
GPU = [(8192, 14336, BF16), (123, 431, F32), (4097, 11008, BF16)]


def _grads(fn, gate, up, dy):
    gate = gate.detach().clone().requires_grad_()
    up = up.detach().clone().requires_grad_()
    y = fn(gate, up)
    y.backward(dy)
    return y, gate.grad, up.grad


@pytest.mark.parametrize("dev,rows,cols,dtype", on_devices(CPU, GPU), indirect=["dev"])
def test_swiglu_matches_reference(dev, rows, cols, dtype):
    torch.manual_seed(rows * cols)
    gate = torch.randn(rows, cols, device=dev, dtype=dtype) * 4  # reach silu's saturated tails
    up = torch.randn(rows, cols, device=dev, dtype=dtype)
    dy = torch.randn(rows, cols, device=dev, dtype=dtype)
    got = _grads(SwiGLUFunction.apply, gate, up, dy)
    ref = _grads(lambda g, u: swiglu_reference(g.float(), u.float()), gate, up, dy.float())
    for name, g, r in zip(("y", "dGate", "dUp"), got, ref):
        assert g.dtype == dtype and g.shape == r.shape
        assert rel_err(g, r) < TOL[dtype], name


@pytest.mark.parametrize("dev", on_devices([()], [()]), indirect=["dev"])
def test_swiglu_keeps_leading_dims_and_non_contiguous_inputs(dev):
    torch.manual_seed(2)
    both = torch.randn(2, 5, 2 * 24, device=dev)
    gate, up = both[..., :24], both[..., 24:]  # halves of one projection: strided views
    y = swiglu(gate, up, backend="triton")
    assert y.shape == (2, 5, 24)
    assert rel_err(y, swiglu_reference(gate, up)) < 1e-6


def test_swiglu_torch_backend_is_the_reference():
    g, u = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.equal(swiglu(g, u, backend="torch"), swiglu_reference(g, u))
