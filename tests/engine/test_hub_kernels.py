"""No kernel from the Hugging Face hub runs: transformers does not kernelize (USE_HUB_KERNELS=0) and
the `kernels` package's loaders refuse, whichever of `kernels` and the engine is imported first
(the locked set has `kernels`: transformers >= 5.25 needs it).

bitsandbytes 0.50 asks `kernels.get_kernel` for a hub kernel while it is imported, on CPUs with
AVX512-BF16; each case runs in a fresh interpreter (outside the repo root) to see that first import.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, os, subprocess, sys
{first}
import bitsandbytes, kernels
try:
    kernels.get_kernel("kernels-community/quantization-bitsandbytes", version=1)
    refused = ""
except Exception as exc:
    refused = type(exc).__name__ + ": " + str(exc)
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('USE_HUB_KERNELS'))"],
                       capture_output=True, text=True).stdout.strip()
print(json.dumps({{"refused": refused, "env": os.environ.get("USE_HUB_KERNELS"), "child": child}}))
"""


@pytest.mark.parametrize("first", ["import cpt_studio.engine", "import kernels, cpt_studio.engine"])
def test_hub_kernels_are_refused_whatever_is_imported_first(tmp_path, first):
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["refused"].startswith("HubKernelRefused: CPT Studio runs no kernels from the Hugging Face hub")
    assert seen["env"] == "0" and seen["child"] == "0"      # workers inherit it
    assert "Failed to load CPU gemm_4bit_forward" not in out.stderr   # the refusal is no warning
