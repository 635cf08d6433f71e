"""Helpers shared by the kernel tests: error measure, tolerances, CPU/GPU parametrisation."""
from __future__ import annotations

import pytest
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (NaN stays NaN and fails comparisons)."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).norm() / e.norm().clamp(min=1e-30)).item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def on_devices(cpu_cases, gpu_cases):
    """pytest params: each CPU case with dev='cpu', each GPU case with dev='cuda' marked gpu."""
    params = [pytest.param("cpu", *c, id=f"cpu-{'-'.join(map(str, c))}") for c in cpu_cases]
    params += [pytest.param("cuda", *c, id=f"cuda-{'-'.join(map(str, c))}", marks=pytest.mark.gpu)
               for c in gpu_cases]
    return params
