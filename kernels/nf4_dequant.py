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
reads 0.5 B and writes 2 B an element (bf16). The first version (one element a lane, the scale
decoded per element through a runtime int64 division) ran at ~2 TB/s on an H200, no faster than
bitsandbytes (27.0 ms for a P1 step's 672 weights against 25.7); this one works on [blocks, 64]
tiles, a scale decoded once per block and a byte loaded once for its two elements. The math is bitsandbytes' own, in the same order
(tests/kernels/test_nf4_dequant.py compares against bitsandbytes when it is installed).
"""
from __future__ import annotations

import torch

from .dispatch import TRITON_AVAILABLE, tl, triton, use_triton

_TILE = 2048   # elements per program: 2048 // blocksize scale blocks (32 of bitsandbytes' 64)

if TRITON_AVAILABLE:

    @triton.jit
    def _nf4_dequant_kernel(PACKED, CODE, ABSMAX, ABSMAX2, CODE2, OFFSET, OUT, n, n_blocks,
                            row_len, out_ld,
                            NESTED: tl.constexpr, TO_BF16: tl.constexpr, BS: tl.constexpr,
                            BS2: tl.constexpr, ROWS: tl.constexpr, STRIDED: tl.constexpr):
        """One program: ROWS scale blocks as a [ROWS, BS] tile. Each scale is decoded once per
        block (not per element), each byte is loaded once and gives two elements; the block
        sizes are constants, so no integer division is left per element. STRIDED: the weight's
        rows (row_len elements, a multiple of BS) go out out_ld elements apart."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)            # [ROWS]
        row_ok = rows < n_blocks
        byte_offs = rows[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]      # [ROWS, BS/2]
        byte = tl.load(PACKED + byte_offs, mask=byte_offs < (n + 1) // 2, other=0).to(tl.int32)
        high = tl.load(CODE + (byte >> 4))           # the element at the even index
        low = tl.load(CODE + (byte & 15))
        if NESTED:
            scale_code = tl.load(ABSMAX + rows, mask=row_ok, other=0).to(tl.int32)
            scale = tl.load(CODE2 + scale_code) * tl.load(ABSMAX2 + rows // BS2, mask=row_ok,
                                                          other=0.0)
            scale = scale + tl.load(OFFSET)
        else:
            scale = tl.load(ABSMAX + rows, mask=row_ok, other=0.0)
        w = tl.reshape(tl.join(high, low), [ROWS, BS]) * scale[:, None]            # [ROWS, BS]
        if TO_BF16:   # round to nearest even on the bits: Triton's interpreter truncates in its cast
            bits = w.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            w = bits.to(tl.float32, bitcast=True)
        offs = rows[:, None] * BS + tl.arange(0, BS)[None, :]
        mask = offs < n
        if STRIDED:   # a block never crosses a row: one division per block
            first = rows * BS
            row = first // row_len
            offs = (row * out_ld + (first - row * row_len))[:, None] + tl.arange(0, BS)[None, :]
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
                shape, dtype: torch.dtype, nested=None, backend: str = "auto",
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The [*shape] weight in `dtype` from bitsandbytes' NF4 layout (see the module docstring).

    Args:
        packed: uint8, two codes a byte. code: fp32 [16]. absmax: fp32 scales, or uint8 codes of
            them when `nested` = (absmax2 fp32, code2 fp32 [256], blocksize2, offset 0-d tensor).
        blocksize: elements per scale. backend: "auto" | "triton" | "torch".
        out: where to write a 2-D weight instead of a new tensor: [rows, cols] of `dtype`, rows
            possibly further apart than cols (a column slice of a wider buffer), cols contiguous.
    """
    n = int(torch.Size(shape).numel())
    if packed.numel() * 2 < n or absmax.numel() * blocksize < n:
        raise ValueError(f"NF4 data of {packed.numel()} bytes and {absmax.numel()} scales of "
                         f"{blocksize} cannot hold a weight of shape {tuple(shape)}")
    power_of_two = blocksize >= 2 and blocksize & (blocksize - 1) == 0
    if out is not None and (tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.dim() != 2
                            or out.stride(1) != 1):
        raise ValueError(f"out must be a [{', '.join(map(str, shape))}] {dtype} matrix with "
                         f"contiguous rows, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    strided = out is not None and out.stride(0) != out.shape[1]
    if not use_triton(packed, backend) or not power_of_two or (strided and out.shape[1] % blocksize):
        # bitsandbytes' block sizes are powers of two; rows that split a block: dequantize, copy
        w = nf4_dequant_reference(packed, code, absmax, blocksize, shape, dtype, nested)
        return w if out is None else out.copy_(w)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    if nested is not None:
        absmax2, code2, blocksize2, offset = nested
        offset = torch.as_tensor(offset, dtype=torch.float32, device=packed.device).reshape(1)
    else:   # unused pointers: any fp32 tensor
        absmax2, code2, blocksize2, offset = code, code, 1, code
    n_blocks, rows = triton.cdiv(n, blocksize), max(1, _TILE // blocksize)
    _nf4_dequant_kernel[(triton.cdiv(n_blocks, rows),)](
        packed, code, absmax, absmax2, code2, offset, out, n, n_blocks,
        out.shape[-1] if strided else 1, out.stride(0) if strided else 1,
        NESTED=nested is not None, TO_BF16=dtype == torch.bfloat16, BS=blocksize, BS2=blocksize2,
        ROWS=rows, STRIDED=strided, num_warps=4)
    return out
