"""RMSNorm (Llama / Mistral / Qwen2 / Qwen3 convention) as a Triton kernel, with its backward.

Forward, per row x of length H (fp32 math whatever the input dtype):
    rstd = 1 / sqrt(mean(x^2) + eps)
    n    = x * rstd                       rounded to x.dtype, as transformers does
    y    = w * n                          dtype = promote(x.dtype, w.dtype), as transformers does

Backward, with g = dy * w (elementwise) and n = x * rstd:
    dW = sum_rows(dy * n)
    dX = rstd * (g - n * mean(g * n))     since d(rstd)/dx = -rstd^3 * x / H

The forward saves x and rstd (4 bytes a row), not y. dW is summed over rows by a persistent grid:
each program owns a slice of row tiles and writes one fp32 partial row; the host sums the
partials (programs = 4 x the multiprocessor count on CUDA).
"""
from __future__ import annotations

import torch

from .dispatch import TRITON_AVAILABLE, num_warps_for, tl, triton, use_triton

# Rows per program when rows are short: keeps tiles of about 4k elements, so small hidden sizes
# (tests, tiny models) do not launch one tiny program per row.
_TILE_ELEMENTS = 4096

if TRITON_AVAILABLE:

    @triton.jit
    def _rmsnorm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps,
                            BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        pid = tl.program_id(0)
        rows = (pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK_COLS)
        row_ok = rows < n_rows
        col_ok = cols < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        n = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = n * w[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _rmsnorm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx,
                            n_rows, n_cols, tiles_per_program,
                            BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_COLS)
        col_ok = cols < n_cols
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        for i in range(0, tiles_per_program):
            tile = pid * tiles_per_program + i
            rows = (tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            n = x * rstd[:, None]
            g = dy * w[None, :]
            mean_gn = tl.sum(g * n, axis=1) / n_cols
            dx = rstd[:, None] * (g - n * mean_gn[:, None])
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
        tl.store(DW_PART + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


def _tile(n_cols: int) -> tuple[int, int]:
    block_cols = triton.next_power_of_2(n_cols)
    return max(1, min(16, _TILE_ELEMENTS // block_cols)), block_cols


def _programs(device: torch.device, n_tiles: int) -> int:
    if device.type == "cuda":  # 4 per SM: one per SM left the backward latency-bound; fwd+bwd at
        # 8192x4096 bf16 on an H200 went 0.61 -> 0.33 ms (floor ~0.08 ms; PyTorch 1.40 ms)
        return min(n_tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_tiles, 2)  # the interpreter runs programs one after another


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """Launches the forward kernel. Returns (y, x2d, rstd); x2d and rstd feed the backward."""
    shape, n_cols = x.shape, x.shape[-1]
    x2d = x.reshape(-1, n_cols)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    n_rows = x2d.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_rows, block_cols = _tile(n_cols)
    _rmsnorm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        x2d, weight, y, rstd, x2d.stride(0), y.stride(0), n_rows, n_cols, eps,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps_for(block_rows * block_cols))
    return y.view(shape), x2d, rstd


def rmsnorm_backward(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Launches the backward kernel. Returns (dx with x2d's shape and dtype, dW fp32)."""
    n_rows, n_cols = x2d.shape
    dy2d = dy.reshape(-1, n_cols)
    if dy2d.stride(-1) != 1:
        dy2d = dy2d.contiguous()
    dx = torch.empty_like(x2d)
    block_rows, block_cols = _tile(n_cols)
    n_tiles = triton.cdiv(n_rows, block_rows)
    programs = max(1, _programs(x2d.device, n_tiles))
    dw_part = torch.empty((programs, n_cols), dtype=torch.float32, device=x2d.device)
    _rmsnorm_bwd_kernel[(programs,)](
        dy2d, x2d, weight, rstd, dx, dw_part, dy2d.stride(0), x2d.stride(0), dx.stride(0),
        n_rows, n_cols, triton.cdiv(n_tiles, programs),
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps_for(block_rows * block_cols))
    return dx, dw_part.sum(0)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton RMSNorm; saves x and rstd, recomputes n in the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, x2d, rstd = rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy, x2d, weight, rstd)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape), dw, None


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure PyTorch, the same arithmetic as transformers' LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension of x; Triton where it can run (see dispatch.use_triton)."""
    if use_triton(x, backend):
        return RMSNormFunction.apply(x, weight, eps)
    return rmsnorm_reference(x, weight, eps)
