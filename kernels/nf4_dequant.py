"""NF4 (4-bit NormalFloat) weights with double-quantized scales, dequantized in one Triton launch.

The layout is bitsandbytes' (what Params4bit / QuantState hold; nothing here imports bitsandbytes):
    packed  uint8 [n / 2]     two 4-bit codes a byte, the element at the even index in the high nibble
    code    fp32 [16]          the NF4 value of each 4-bit code
    absmax  fp32 [n / bs]      one scale per block of bs (64) consecutive elements, or, double-quantized:
    absmax  uint8 [n / bs]     8-bit codes of the scales, decoded as
                               code2[absmax] * absmax2[block // bs2] + offset   (bs2 = 256)
    w[e] = code[nibble(e)] * scale[e // bs]                       (fp32, rounded once to the output dtype)

bitsandbytes does this in two launches a weight when the scales are double-quantized (the scales,
then the weights) plus an add for the offset, each through the torch op dispatcher; a P1 step
(Llama-8B, LoRA on 224 projections, checkpoint recompute) dequantizes 672 weights. One launch here
reads 0.5 B and writes 2 B an element (bf16). The math is bitsandbytes' own, in the same order
(tests/kernels/test_nf4_dequant.py compares against bitsandbytes when it is installed).
"""
from __future__ import annotations

import torch

from .dispatch import TRITON_AVAILABLE, tl, triton, use_triton

_BLOCK = 2048

if TRITON_AVAILABLE:

    @triton.jit
    def _nf4_dequant_kernel(PACKED, CODE, ABSMAX, ABSMAX2, CODE2, OFFSET, OUT, n, bs, bs2,
                            NESTED: tl.constexpr, TO_BF16: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        byte = tl.load(PACKED + offs // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where((offs % 2) == 0, byte >> 4, byte & 15)
        value = tl.load(CODE + nibble, mask=mask, other=0.0)
        block = offs // bs
        if NESTED:
            scale_code = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(CODE2 + scale_code, mask=mask, other=0.0) * tl.load(
                ABSMAX2 + block // bs2, mask=mask, other=0.0)
            scale = scale + tl.load(OFFSET)
        else:
            scale = tl.load(ABSMAX + block, mask=mask, other=0.0)
        w = value * scale
        if TO_BF16:   # round to nearest even on the bits: Triton's interpreter truncates in its cast
            bits = w.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            w = bits.to(tl.float32, bitcast=True)
        tl.store(OUT + offs, w.to(OUT.dtype.element_ty), mask=mask)


def nf4_dequant_reference(packed, code, absmax, blocksize, shape, dtype, nested=None) -> torch.Tensor:
    """Pure PyTorch, the same math: `nested` = (absmax2, code2, blocksize2, offset) or None."""
    if nested is not None:
        absmax2, code2, blocksize2, offset = nested
        scales = code2[absmax.long()] * absmax2.repeat_interleave(blocksize2)[: absmax.numel()]
        absmax = scales + offset
    data = packed.reshape(-1)
    nibbles = torch.stack([data >> 4, data & 15], dim=1).reshape(-1).long()
    n = int(torch.Size(shape).numel())
    values = code[nibbles[:n]] * absmax.float().repeat_interleave(blocksize)[:n]
    return values.to(dtype).reshape(shape)


def nf4_dequant(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                shape, dtype: torch.dtype, nested=None, backend: str = "auto") -> torch.Tensor:
    """The [*shape] weight in `dtype` from bitsandbytes' NF4 layout (see the module docstring).

    Args:
        packed: uint8, two codes a byte. code: fp32 [16]. absmax: fp32 scales, or uint8 codes of
            them when `nested` = (absmax2 fp32, code2 fp32 [256], blocksize2, offset 0-d tensor).
        blocksize: elements per scale. backend: "auto" | "triton" | "torch".
    """
    n = int(torch.Size(shape).numel())
    if packed.numel() * 2 < n or absmax.numel() * blocksize < n:
        raise ValueError(f"NF4 data of {packed.numel()} bytes and {absmax.numel()} scales of "
                         f"{blocksize} cannot hold a weight of shape {tuple(shape)}")
    if not use_triton(packed, backend):
        return nf4_dequant_reference(packed, code, absmax, blocksize, shape, dtype, nested)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if nested is not None:
        absmax2, code2, blocksize2, offset = nested
        offset = torch.as_tensor(offset, dtype=torch.float32, device=packed.device).reshape(1)
    else:   # unused pointers: any fp32 tensor
        absmax2, code2, blocksize2, offset = code, code, 1, code
    _nf4_dequant_kernel[(triton.cdiv(n, _BLOCK),)](
        packed, code, absmax, absmax2, code2, offset, out, n, blocksize, blocksize2,
        NESTED=nested is not None, TO_BF16=dtype == torch.bfloat16, BLOCK=_BLOCK, num_warps=4)
    return out
