"""AdamW step with 8-bit moments and stochastic rounding into bf16, fused into one Triton pass.

State of a parameter of n elements, cut into blocks of QBLOCK = 256 consecutive elements of the
flattened tensor (nb = ceil(n / 256) blocks, each with the absmax of its new values as scale):
    m_q int8 [n], v_q uint8 [n], m_scale fp32 [nb], v_scale fp32 [nb]
Quantization (a block of zeros has scale 0 and decodes to 0):
    m (signed):    x = 127 sqrt(|m| / absmax_m), q = sign(m) R(x)    m = absmax_m sign(q) (q / 127)^2
    u = sqrt(v):   x = 255 sqrt(u / absmax_u),   q = R(x)            u = absmax_u (q / 255)^2, v = u^2
R is stochastic rounding (floor(x + r), r uniform from 8 random bits) with stochastic_rounding,
and then v's code is never 0 while v > 0 (a v decoded as 0 would turn m / (sqrt(v) + eps) into
m / eps). Without it, m rounds to nearest and v up (ceil, with a 2^-20 guard against fp32 noise),
so v is never below the truth. Why stochastic by default: a moment that decays by 0.999 a step
moves far less than one code level, so deterministic codes stick; ceil keeps v too high and the
steps too small (a least-squares fit ended 15% behind torch AdamW; round-to-nearest 7.5%; rounded
stochastically, no gap measured).

Step t, fp32 math in torch.optim.AdamW's order, g = 0 on rows without a gradient:
    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
    p = p (1 - lr wd),       p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
The update uses the new m and v before quantization (quantized only for storage). A bf16 param is
stored by stochastic rounding: a random 16-bit integer (philox on (seed, element offset)) is added
to the fp32 bit pattern and the low 16 bits are dropped, so E[stored] = p and updates far below
half an ulp (lr 5e-6 on a weight of 0.02) still move the weight on average.

One program owns BLOCKS whole quantization blocks ([BLOCKS, 256] tile, absmax = max over axis 1):
one read of p, g, m_q, v_q and one write of p, m_q, v_q; 10 bytes an element for a bf16 param with
a bf16 grad. Measured on H200 (bench/kernels_micro.py --only adamw8bit), a 128256 x 4096 bf16
param: 1.59 ms with a dense bf16 grad (3.3 TB/s; a bf16 copy runs at 4.3), 1.76 ms with a
4096-row sparse grad, against 15.1 ms for bitsandbytes' AdamW8bit step on the fp32 param.
A row-sparse grad (row_index [k], row_values [k, cols]) of a 2-D param goes through an int32 slot
map [rows] (-1: no gradient), so it reads k rows instead of a dense zero-filled grad.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import TRITON_AVAILABLE, TRITON_INTERPRETED, tl, triton, use_triton

QBLOCK = 256
# [4, 256] tiles on CUDA (8 blocks: +3% time on H200, 16: slower still). Interpreted, a program
# costs Python overhead: 16 blocks make the CPU tests 4x faster and change no result.
_BLOCKS_PER_PROGRAM = 16 if TRITON_INTERPRETED else 4
_INV_127_SQ = 1.0 / (127 * 127)
_INV_255_SQ = 1.0 / (255 * 255)
# ceil(x * (1 - 2^-20)), not ceil(x): a block that only decays (a row without gradient) decodes to
# exact levels, and fp32 noise of a few ulp above a level would ratchet its code up one level a
# step (measured: +61 levels in 1000 steps without gradient). v may then sit 2e-6 below the truth.
_CEIL_GUARD = 1.0 - 2.0**-20

if TRITON_AVAILABLE:

    @triton.jit
    def _random_u32(seed, blocks, BLOCKS: tl.constexpr, QBLOCK: tl.constexpr):
        """[BLOCKS, QBLOCK] uniform 32-bit integers, one philox call (4 x 32 bits) per 4 elements:
        16 bits for the bf16 param's rounding, 8 each for the two moment codes' rounding."""
        counters = blocks[:, None] * (QBLOCK // 4) + tl.arange(0, QBLOCK // 4)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, counters)
        r = tl.join(tl.join(r0, r1), tl.join(r2, r3))        # [BLOCKS, QBLOCK // 4, 2, 2]
        return tl.reshape(r, [BLOCKS, QBLOCK])

    # seed differs every step: unspecialised, or Triton would compile a second variant the first
    # time a seed is divisible by 16 (a 1.3 s step in the middle of a P2 run on H200)
    @triton.jit(do_not_specialize=["seed"])
    def _adamw8bit_kernel(P, G, SLOT, MQ, VQ, MS, VS, n, n_cols,
                          beta1, one_minus_beta1, beta2, one_minus_beta2,
                          decay, step_size, inv_bc2_sqrt, eps, seed,
                          SPARSE: tl.constexpr, ROW_ALIGNED: tl.constexpr, TO_BF16: tl.constexpr,
                          STOCHASTIC: tl.constexpr,
                          BLOCKS: tl.constexpr, QBLOCK: tl.constexpr):
        blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)       # [BLOCKS]
        offs = blocks[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]               # [BLOCKS, QBLOCK]
        mask = offs < n
        block_ok = blocks * QBLOCK < n
        if SPARSE:
            start = blocks * QBLOCK
            row0 = start // n_cols                # one int64 division a block
            col = (start - row0 * n_cols).to(tl.int32)[:, None] + tl.arange(0, QBLOCK)[None, :]
            if ROW_ALIGNED:   # cols % 256 == 0: each block lies in one row, one slot a block
                slot = tl.load(SLOT + row0, mask=block_ok, other=-1)[:, None]
            else:             # int32 divisions within the block
                dr = col // n_cols
                slot = tl.load(SLOT + (row0[:, None] + dr), mask=mask, other=-1)
                col = col - dr * n_cols
            has = mask & (slot >= 0)
            g = tl.load(G + slot.to(tl.int64) * n_cols + col, mask=has, other=0.0)
        else:
            g = tl.load(G + offs, mask=mask, other=0.0)
        g = g.to(tl.float32)
        p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
        qm = tl.load(MQ + offs, mask=mask, other=0).to(tl.float32)
        qv = tl.load(VQ + offs, mask=mask, other=0).to(tl.float32)
        ms = tl.load(MS + blocks, mask=block_ok, other=0.0)
        vs = tl.load(VS + blocks, mask=block_ok, other=0.0)

        # literals = _INV_127_SQ, _INV_255_SQ, _CEIL_GUARD (a jit function reads no plain globals)
        m = qm * tl.abs(qm) * (ms * (1.0 / 16129.0))[:, None]
        u = qv * qv * (vs * (1.0 / 65025.0))[:, None]
        # CUDA: sqrt.approx and div.full (within 2 ulp) instead of sqrt_rn / div_rn: 3.4 -> 2.4 ms
        # a 128256 x 4096 step on H200; interpreted, numpy rounds correctly, like the reference.
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * (u * u) + one_minus_beta2 * (g * g)
        u = tl.sqrt(v)
        p = p * decay
        p = p - step_size * (m / (u * inv_bc2_sqrt + eps))

        # blockwise absmax quantization of the new moments
        am = tl.max(tl.abs(m), axis=1)
        au = tl.max(u, axis=1)
        ones = tl.full([BLOCKS], 1.0, tl.float32)
        inv_m = tl.where(am > 0, tl.div_rn(ones, tl.where(am > 0, am, 1.0)), 0.0)
        inv_u = tl.where(au > 0, tl.div_rn(ones, tl.where(au > 0, au, 1.0)), 0.0)
        xm = 127.0 * tl.sqrt(tl.abs(m) * inv_m[:, None])
        xv = 255.0 * tl.sqrt(u * inv_u[:, None])
        if STOCHASTIC:   # codes rounded stochastically; v never to 0 while v > 0
            r = _random_u32(seed, blocks, BLOCKS, QBLOCK)
            qm = tl.minimum(tl.floor(xm + ((r >> 16) & 0xFF).to(tl.float32) * (1.0 / 256.0)), 127.0)
            qv = tl.minimum(tl.floor(xv + (r >> 24).to(tl.float32) * (1.0 / 256.0)), 255.0)
            qv = tl.where(u > 0, tl.maximum(qv, 1.0), qv)
        else:            # m to nearest, v up (never below the true v)
            qm = tl.minimum(tl.floor(xm + 0.5), 127.0)
            qv = tl.minimum(tl.ceil(xv * (1.0 - 2.0**-20)), 255.0)
        qm = tl.where(m < 0, -qm, qm)
        tl.store(MQ + offs, qm.to(tl.int8), mask=mask)
        tl.store(VQ + offs, qv.to(tl.uint8), mask=mask)
        tl.store(MS + blocks, am, mask=block_ok)
        tl.store(VS + blocks, au, mask=block_ok)

        if TO_BF16:
            # Rounding by hand on the fp32 bits, so the result (exactly representable in bf16) is
            # the same compiled or interpreted (the interpreter's fp32 -> bf16 cast truncates).
            bits = p.to(tl.uint32, bitcast=True)
            if STOCHASTIC:
                bits = bits + (r & 0xFFFF)
            else:   # round to nearest, ties to even
                bits = bits + (0x7FFF + ((bits >> 16) & 1))
            p = tl.where(p == p, (bits & 0xFFFF0000).to(tl.float32, bitcast=True), p)   # keeps NaN
        tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)


def init_adamw8bit_state(param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero state of `param`: m_q int8 [n], v_q uint8 [n], m_scale / v_scale fp32 [ceil(n/256)]."""
    n, dev = param.numel(), param.device
    nb = -(-n // QBLOCK)
    return {"m_q": torch.zeros(n, dtype=torch.int8, device=dev),
            "v_q": torch.zeros(n, dtype=torch.uint8, device=dev),
            "m_scale": torch.zeros(nb, dtype=torch.float32, device=dev),
            "v_scale": torch.zeros(nb, dtype=torch.float32, device=dev)}


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt, as numpy's in the interpreted kernel (torch's AVX512 sqrt is
    an ulp off on ~15% of inputs); a float64 sqrt rounded to fp32 is correctly rounded."""
    return x.double().sqrt().float()


def _safe_reciprocal(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 1.0 / torch.where(x > 0, x, 1.0), 0.0)


def quantize_first_moment(m: torch.Tensor, noise: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """m [nb, 256] fp32 -> (int8 codes [nb, 256], absmax scale [nb]); rounded to nearest, or
    stochastically with `noise` (uniform in [0, 1), [nb, 256])."""
    am = m.abs().amax(dim=1)
    x = 127.0 * _sqrt_rn(m.abs() * _safe_reciprocal(am)[:, None])
    q = (x + (0.5 if noise is None else noise)).floor().clamp(max=127.0)
    return torch.where(m < 0, -q, q).to(torch.int8), am


def dequantize_first_moment(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes [nb, 256] and scales [nb] -> m fp32: scale * sign(q) * (q / 127)^2."""
    q = q.float()
    return q * q.abs() * (scale * _INV_127_SQ)[:, None]


def quantize_second_moment(u: torch.Tensor, noise: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """u = sqrt(v) [nb, 256] fp32 -> (uint8 codes [nb, 256], absmax scale [nb]); rounds up, or
    stochastically with `noise` (uniform in [0, 1)) but never to code 0 while u > 0."""
    au = u.amax(dim=1)
    x = 255.0 * _sqrt_rn(u * _safe_reciprocal(au)[:, None])
    if noise is None:
        q = (x * _CEIL_GUARD).ceil().clamp(max=255.0)
    else:
        q = (x + noise).floor().clamp(max=255.0)
        q = torch.where(u > 0, q.clamp(min=1.0), q)
    return q.to(torch.uint8), au


def dequantize_second_moment(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 codes [nb, 256] and scales [nb] -> u = sqrt(v) fp32: scale * (q / 255)^2."""
    q = q.float()
    return q * q * (scale * _INV_255_SQ)[:, None]


def _coefficients(step, lr, beta1, beta2, eps, weight_decay) -> dict[str, float]:
    """Host-side scalars (float64 here, fp32 in the kernel), shared by both paths."""
    return {"beta1": beta1, "one_minus_beta1": 1.0 - beta1, "beta2": beta2,
            "one_minus_beta2": 1.0 - beta2, "decay": 1.0 - lr * weight_decay,
            "step_size": lr / (1.0 - beta1 ** step), "inv_bc2_sqrt": 1.0 / math.sqrt(1.0 - beta2 ** step),
            "eps": eps}


def adamw8bit_reference(param, grad, state, *, c: dict[str, float], stochastic: bool, seed: int) -> None:
    """Pure PyTorch, in place, the same arithmetic as the kernel; `c` from _coefficients.

    Its stochastic rounding draws torch.randint from a Generator seeded with `seed`: unbiased like
    the kernel's philox, but not the same bits.
    """
    n, nb = param.numel(), state["m_scale"].numel()

    def tiles(x):  # flat [n] -> [nb, QBLOCK] fp32, tail zero-padded
        return F.pad(x.reshape(-1).float(), (0, nb * QBLOCK - n)).view(nb, QBLOCK)

    if isinstance(grad, tuple):
        index, values = grad
        dense = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        dense[index] = values.float()
        grad = dense
    g = tiles(grad)
    m = dequantize_first_moment(tiles(state["m_q"]), state["m_scale"])
    u = dequantize_second_moment(tiles(state["v_q"]), state["v_scale"])
    m = c["beta1"] * m + c["one_minus_beta1"] * g
    v = c["beta2"] * (u * u) + c["one_minus_beta2"] * (g * g)
    u = _sqrt_rn(v)
    p = tiles(param) * c["decay"]
    p = p - c["step_size"] * (m / (u * c["inv_bc2_sqrt"] + c["eps"]))

    bits = noise_m = noise_v = None
    if stochastic:   # 32 random bits an element, split as in the kernel
        gen = torch.Generator(device=param.device)
        gen.manual_seed(seed)
        bits = torch.randint(0, 1 << 32, (nb * QBLOCK,), generator=gen, device=param.device,
                             dtype=torch.int64)
        noise_m = ((bits >> 16) & 0xFF).float().view(nb, QBLOCK) / 256.0
        noise_v = (bits >> 24).float().view(nb, QBLOCK) / 256.0
    for key, (q, scale) in (("m", quantize_first_moment(m, noise_m)),
                            ("v", quantize_second_moment(u, noise_v))):
        state[f"{key}_q"].copy_(q.view(-1)[:n])
        state[f"{key}_scale"].copy_(scale)
    p = p.view(-1)[:n]
    if stochastic and param.dtype == torch.bfloat16:
        noise = (bits[:n] & 0xFFFF).to(torch.int32)
        p = ((p.view(torch.int32) + noise) & -65536).view(torch.float32)
    param.view(-1).copy_(p)   # into bf16: round to nearest even (exact after the truncation above)


def adamw8bit_launch(param, grad, state, *, c: dict[str, float], stochastic: bool, seed: int) -> None:
    """Launches the Triton kernel over contiguous `param` and its state, in place."""
    n, nb = param.numel(), state["m_scale"].numel()
    if isinstance(grad, tuple):
        index, values = grad
        rows, cols = param.shape
        slot = torch.full((rows,), -1, dtype=torch.int32, device=param.device)
        slot[index] = torch.arange(index.numel(), dtype=torch.int32, device=param.device)
        values = values.contiguous() if values.numel() else torch.zeros(1, device=param.device)
        g, sparse = values, True
    else:
        g, slot, cols, sparse = grad.contiguous(), state["m_scale"], 1, False   # slot unused
    grid = (triton.cdiv(nb, _BLOCKS_PER_PROGRAM),)
    _adamw8bit_kernel[grid](param, g, slot, state["m_q"], state["v_q"], state["m_scale"],
                            state["v_scale"], n, cols, seed=seed, SPARSE=sparse,
                            ROW_ALIGNED=cols % QBLOCK == 0, TO_BF16=param.dtype == torch.bfloat16,
                            STOCHASTIC=stochastic,
                            BLOCKS=_BLOCKS_PER_PROGRAM, QBLOCK=QBLOCK, num_warps=4, **c)


def _check(param, grad, state) -> None:
    if param.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"The 8-bit AdamW step updates float32 or bfloat16 params, not {param.dtype}")
    if not param.is_contiguous():
        raise ValueError("The 8-bit AdamW step needs a contiguous param; call .contiguous() on it first")
    if state["m_q"].numel() != param.numel() or state["v_q"].numel() != param.numel():
        raise ValueError(f"The 8-bit AdamW state holds {state['m_q'].numel()} elements, the param "
                         f"{param.numel()}; build it with init_adamw8bit_state(param)")
    if isinstance(grad, tuple):
        index, values = grad
        if param.dim() != 2 or index.dim() != 1 or values.shape != (index.numel(), param.shape[1]):
            raise ValueError(f"A row-sparse grad needs a 2-D param and values [k, cols]; got param "
                             f"{tuple(param.shape)}, index {tuple(index.shape)}, "
                             f"values {tuple(values.shape)}")
    elif grad.shape != param.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} differs from param shape {tuple(param.shape)}")


def adamw8bit_step(param: torch.Tensor, grad, state: dict[str, torch.Tensor], *, step: int,
                   lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.0, stochastic_rounding: bool = True, seed: int = 0,
                   backend: str = "auto") -> None:
    """One AdamW step of `param` in place, with 8-bit moments in `state` (init_adamw8bit_state).

    Args:
        param: float32 or bfloat16, contiguous.
        grad: a Tensor of param's shape (fp32 or bf16), or (row_index int64 [k], row_values
            [k, cols]) for a 2-D param: unique rows (a coalesced sparse grad); other rows get g = 0
            but still decay and move, as in AdamW. Bitwise the same as the dense zero-row grad.
        step: the step number t >= 1 (bias corrections).
        stochastic_rounding: round the moment codes stochastically, and a bf16 param too (an fp32
            param is stored as it is). Off: codes to nearest (m) / up (v), bf16 to nearest even.
        seed: philox seed of this (param, step); the same seed gives the same bits.
        backend: "auto" | "triton" | "torch" (see dispatch.use_triton).
    """
    _check(param, grad, state)
    if param.numel() == 0:
        return
    c = _coefficients(step, lr, beta1, beta2, eps, weight_decay)
    stochastic = bool(stochastic_rounding)
    run = adamw8bit_launch if use_triton(param, backend) else adamw8bit_reference
    run(param, grad, state, c=c, stochastic=stochastic, seed=seed)
