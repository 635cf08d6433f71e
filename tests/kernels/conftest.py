"""Kernel tests: on a machine without CUDA, Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before the kernels are defined (Triton decides at decoration time)
and must stay set while they run, so it is set here, at collection, for the whole session.
GPU cases are marked `gpu` and deselected by default; on the device: pytest -m gpu tests/kernels.
Shared case helpers live in kernel_cases.py.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cpt_studio.kernels import dispatch  # noqa: E402  (after the env var on purpose)


@pytest.fixture
def dev(request) -> str:
    """'cpu' (interpreted Triton) or 'cuda': parametrised indirectly through kernel_cases.on_devices."""
    dev = request.param
    if dev == "cpu" and not dispatch.TRITON_INTERPRETED:
        pytest.fail("Triton's interpreter is not on (Triton missing, or kernels imported before "
                    "TRITON_INTERPRET was set): the CPU kernel checks cannot run")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return dev


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every kernel test runs on one intra-op thread (tests/conftest.py one_torch_thread)."""
