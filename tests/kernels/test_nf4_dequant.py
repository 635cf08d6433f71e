"""NF4 dequantization in one launch: Triton vs the PyTorch reference vs bitsandbytes itself."""
from __future__ import annotations

import bitsandbytes.functional as bnb_functional   # a dependency (pyproject): no skip without it
import pytest
import torch

from cpt_studio.kernels.nf4_dequant import nf4_dequant, nf4_dequant_reference
from kernel_cases import on_devices


def _quantized(shape, nested, dev, seed=0, blocksize=64):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * torch.logspace(-2, 0, shape[-1])).to(dev)
    packed, qs = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                              compress_statistics=nested)
    extra = ((qs.state2.absmax, qs.state2.code, qs.state2.blocksize, qs.offset) if nested else None)
    return w, packed, qs, extra


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dev,shape,nested,dtype", on_devices(
    [((6, 64), False, torch.float32), ((192, 128), True, torch.bfloat16),
     ((37, 320), True, torch.float32), ((7, 50), True, torch.bfloat16)],
    [((4096, 14336), True, torch.bfloat16), ((1024, 4096), True, torch.bfloat16),
     ((576, 192), False, torch.float16)]), indirect=["dev"])
def test_one_launch_equals_bitsandbytes(dev, shape, nested, dtype, blocksize):
    """(7, 50): 350 elements, the last scale block partial."""
    _, packed, qs, extra = _quantized(shape, nested, dev, blocksize=blocksize)
    got = nf4_dequant(packed, qs.code, qs.absmax, qs.blocksize, qs.shape, dtype, extra, backend="triton")
    ref = nf4_dequant_reference(packed, qs.code, qs.absmax, qs.blocksize, qs.shape, dtype, extra)
    theirs = bnb_functional.dequantize_4bit(packed, qs).to(torch.float32)   # fp32, then rounded
    assert got.dtype == dtype and got.shape == shape
    if blocksize == 64 or dtype != torch.float32 or not str(dev).startswith("cpu"):
        # On CPU, bitsandbytes 0.50 quantizes fp32 at blocksize 128 into something its own
        # dequantize reads back but the layout above does not (some blocks' scales come out
        # doubled); the CUDA cases check 128 against bitsandbytes' CUDA layout.
        assert torch.equal(ref, theirs.to(dtype))
    # A fused multiply-add may round the double-quantized scale once instead of twice: at most
    # one unit in the last place of the output, on few elements.
    diff = (got.float() - ref.float()).abs()
    ulp = ref.float().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10 if dtype == torch.float16
                               else 2.0 ** -22)
    assert (diff <= ulp + 1e-30).all()
    assert (diff == 0).float().mean() > 0.99


def test_a_layout_too_small_for_the_shape_is_refused():
    _, packed, qs, _ = _quantized((6, 64), False, "cpu")
    with pytest.raises(ValueError, match="cannot hold a weight of shape"):
        nf4_dequant(packed, qs.code, qs.absmax, qs.blocksize, (12, 64), torch.float32, None)


@pytest.mark.parametrize("dev,shape,nested,dtype,extra_cols", on_devices(
    [((6, 128), True, torch.bfloat16, 48), ((5, 64), False, torch.float32, 16),
     ((7, 50), True, torch.bfloat16, 14)],           # 50: rows split a scale block (copied)
    [((4096, 4096), True, torch.bfloat16, 48), ((1024, 2048), True, torch.bfloat16, 16)]),
    indirect=["dev"])
def test_into_the_left_columns_of_a_wider_buffer(dev, shape, nested, dtype, extra_cols):
    """out= a column slice of a [rows, cols + extra] buffer (kernels/lora_4bit_group.py's [W | B]):
    the same values as a new tensor, and the columns right of it untouched."""
    _, packed, qs, extra = _quantized(shape, nested, dev)
    whole = nf4_dequant(packed, qs.code, qs.absmax, qs.blocksize, qs.shape, dtype, extra, backend="triton")
    buffer = torch.full((shape[0], shape[1] + extra_cols), 7.0, dtype=dtype, device=dev)
    got = nf4_dequant(packed, qs.code, qs.absmax, qs.blocksize, qs.shape, dtype, extra,
                      backend="triton", out=buffer[:, :shape[1]])
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(buffer[:, :shape[1]], whole)
    assert (buffer[:, shape[1]:] == 7.0).all()
    with pytest.raises(ValueError, match="contiguous rows"):   # one column short
        nf4_dequant(packed, qs.code, qs.absmax, qs.blocksize, qs.shape, dtype, extra,
                    out=buffer[:, :shape[1] - 1])
