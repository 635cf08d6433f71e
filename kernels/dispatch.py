"""Which implementation of an op runs: Triton on CUDA, Triton's interpreter on CPU, or PyTorch.

Triton is an optional dependency. `triton` and `tl` are None when it is missing; the op modules
define their Triton kernels only when `TRITON_AVAILABLE` is true, so importing the package never
fails on a machine without Triton.

Backends, as the `backend` argument of every op spells them:
- "auto": Triton when the tensors live on CUDA, or on CPU when Triton's interpreter was on
  (TRITON_INTERPRET=1) at the time the kernels were defined; otherwise the PyTorch path.
- "triton": Triton, or a RuntimeError saying why it cannot run here.
- "torch": the pure-PyTorch path (same math, no Triton).
"""
from __future__ import annotations

import os

import torch

try:  # optional dependency
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised in a subprocess by tests/kernels/test_import.py
    triton = None
    tl = None
    TRITON_AVAILABLE = False

# Triton decides at decoration time whether a kernel is compiled or interpreted, so what counts
# is the environment when this module (imported before every op module) was first imported.
TRITON_INTERPRETED = TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when Triton is importable (kernels can run on CUDA, or interpreted on CPU)."""
    return TRITON_AVAILABLE


def use_triton(tensor: torch.Tensor, backend: str = "auto") -> bool:
    """Whether the op on `tensor` runs its Triton kernel (True) or the PyTorch path (False).

    Raises:
        ValueError: unknown backend name.
        RuntimeError: backend="triton" where Triton cannot run (not installed, or CPU tensors
            without the interpreter, or the interpreter on with CUDA tensors).
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    runnable = TRITON_AVAILABLE and (
        (tensor.is_cuda and not TRITON_INTERPRETED) or (tensor.device.type == "cpu" and TRITON_INTERPRETED))
    if backend == "triton" and not runnable:
        if not TRITON_AVAILABLE:
            why = "Triton is not installed (pip install triton)"
        elif tensor.device.type == "cpu":
            why = "CPU tensors need TRITON_INTERPRET=1 set before cpt_studio.kernels is imported"
        else:
            why = f"tensors on {tensor.device} with TRITON_INTERPRET={int(TRITON_INTERPRETED)}"
        raise RuntimeError(f"The Triton kernel cannot run here: {why}; use backend='torch'")
    return runnable


def num_warps_for(block: int) -> int:
    """Warps for a program that streams `block` elements of one row (more warps for long rows)."""
    if block >= 16384:
        return 16
    if block >= 4096:
        return 8
    return 4
