"""8-bit AdamW step: the Triton kernel vs the PyTorch reference, the quantization's error bounds,
row-sparse grads, and stochastic rounding into bf16 (unbiased, reproducible)."""
from __future__ import annotations

import pytest
import torch

from cpt_studio.kernels.adamw8bit import (
    QBLOCK, adamw8bit_step, dequantize_first_moment, dequantize_second_moment, init_adamw8bit_state)
from kernel_cases import on_devices, rel_err

F32, BF16 = torch.float32, torch.bfloat16
# (shape, param dtype, weight decay, sparse grad)
CPU = [((6, 42), F32, 0.0, False), ((6, 42), BF16, 0.1, True), ((123, 431), BF16, 0.0, False),
       ((123, 431), F32, 0.1, True), ((1000,), F32, 0.1, False), ((1000,), BF16, 0.0, False),
       ((5, 512), F32, 0.0, True)]   # rows of whole blocks: the kernel's one-slot-a-block path
GPU = [((128256, 4096), BF16, 0.0, True), ((4097, 4096), BF16, 0.1, False), ((123, 431), F32, 0.1, True),
       ((2**20 + 3,), F32, 0.0, False)]
HP = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def _grad(shape, dev, sparse, gen):
    """A random grad: dense, or (row_index, row_values) for about a third of the rows."""
    if not sparse:
        return torch.randn(shape, device=dev, generator=gen)
    rows = torch.randperm(shape[0], device=dev, generator=gen)[: max(1, shape[0] // 3)]
    return rows, torch.randn(rows.numel(), shape[1], device=dev, generator=gen).to(BF16)


def _dense(grad, shape):
    if not isinstance(grad, tuple):
        return grad
    dense = torch.zeros(shape, dtype=grad[1].dtype, device=grad[1].device)
    dense[grad[0]] = grad[1]
    return dense


def _decoded(state):
    """(m, u = sqrt(v)) of a state, flat fp32."""
    nb = state["m_scale"].numel()
    pad = nb * QBLOCK - state["m_q"].numel()
    tiles = lambda q: torch.nn.functional.pad(q, (0, pad)).view(nb, QBLOCK)  # noqa: E731
    n = state["m_q"].numel()
    return (dequantize_first_moment(tiles(state["m_q"]), state["m_scale"]).view(-1)[:n],
            dequantize_second_moment(tiles(state["v_q"]), state["v_scale"]).view(-1)[:n])


@pytest.mark.parametrize("dev,shape,dtype,wd,sparse", on_devices(CPU, GPU), indirect=["dev"])
def test_adamw8bit_kernel_matches_reference(dev, shape, dtype, wd, sparse):
    gen = torch.Generator(device=dev).manual_seed(sum(shape))
    p0 = torch.randn(shape, device=dev, generator=gen).to(dtype)
    runs = {b: (p0.clone(), init_adamw8bit_state(p0)) for b in ("triton", "torch")}
    for step in (1, 2, 3):   # states written by one step are decoded by the next
        grad = _grad(shape, dev, sparse, gen)
        for backend, (p, state) in runs.items():
            adamw8bit_step(p, grad, state, step=step, weight_decay=wd, stochastic_rounding=False,
                           backend=backend, **HP)
    (p_k, s_k), (p_r, s_r) = runs["triton"], runs["torch"]
    assert p_k.dtype == dtype and not torch.equal(p_k, p0)
    if dev == "cpu":   # the interpreter runs the same correctly rounded fp32 ops as the reference
        assert torch.equal(p_k, p_r)
        assert all(torch.equal(s_k[key], s_r[key]) for key in s_k)
        return
    # CUDA may contract a*b + c into one FMA: a code then lands one level off, rarely (2e-6 of
    # them on H200); the next steps carry that difference, and near m = 0 (sqrt mapping) a tiny
    # difference in value is many levels, so codes are compared by how many differ.
    assert rel_err(p_k.float() - p0.float(), p_r.float() - p0.float()) < (1e-4 if dtype == F32 else 2e-2)
    for name, a, b in zip(("m", "sqrt(v)"), _decoded(s_k), _decoded(s_r)):
        assert rel_err(a, b) < 1e-3, name
    for key in ("m_q", "v_q"):
        assert (s_k[key] != s_r[key]).float().mean().item() < 1e-4, key


@pytest.mark.parametrize("dev,dtype,cols", on_devices([(BF16, 77), (F32, 77), (BF16, 512)],
                                                    [(BF16, 77), (BF16, 4096)]), indirect=["dev"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_row_sparse_grad_is_bitwise_the_dense_grad_with_zero_rows(dev, dtype, cols, backend):
    gen = torch.Generator(device=dev).manual_seed(3)
    p0 = torch.randn(40, cols, device=dev, generator=gen).to(dtype)
    pd, ps = p0.clone(), p0.clone()
    sd, ss = init_adamw8bit_state(p0), init_adamw8bit_state(p0)
    for step in (1, 2, 3):
        grad = _grad(p0.shape, dev, True, gen)
        kw = dict(step=step, weight_decay=0.1, stochastic_rounding=True, seed=step, backend=backend, **HP)
        adamw8bit_step(pd, _dense(grad, p0.shape), sd, **kw)
        adamw8bit_step(ps, grad, ss, **kw)
    assert torch.equal(pd, ps)
    assert all(torch.equal(sd[key], ss[key]) for key in sd)
    rows_without_grad = (_dense(grad, p0.shape) == 0).all(dim=1)
    assert (pd[rows_without_grad] != p0[rows_without_grad]).any()   # they decay and move too


@pytest.mark.parametrize("dev", on_devices([()], [()]), indirect=["dev"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_quantized_moments_stay_close_and_v_is_never_underestimated(dev, backend):
    # beta1 = beta2 = 0: the stored moments are the quantized g and g^2 of this one step
    gen = torch.Generator(device=dev).manual_seed(5)
    n = 7 * QBLOCK + 100
    magnitudes = torch.logspace(-6, 0, n, device=dev)[torch.randperm(n, device=dev, generator=gen)]
    g = torch.randn(n, device=dev, generator=gen) * magnitudes
    p = torch.zeros(n, device=dev)
    state = init_adamw8bit_state(p)
    adamw8bit_step(p, g, state, step=1, lr=1e-3, beta1=0.0, beta2=0.0, eps=1e-8, backend=backend,
                   stochastic_rounding=False)   # deterministic codes: m to nearest, v up
    m, u = _decoded(state)
    nb = state["m_scale"].numel()
    block_max = torch.nn.functional.pad(g.abs(), (0, nb * QBLOCK - n)).view(nb, QBLOCK).amax(1)
    large = g.abs() >= block_max.repeat_interleave(QBLOCK)[:n] / 4
    assert torch.equal(state["m_scale"], block_max)
    torch.testing.assert_close(state["v_scale"], block_max, rtol=1e-6, atol=0)   # CUDA: sqrt.approx
    assert ((m - g).abs() / g.abs())[large].max() < 0.017     # half a level of 127 at sqrt >= 1/2
    assert torch.equal(torch.sign(m)[m != 0], torch.sign(g)[m != 0])
    v, v_true = u.double() ** 2, g.double() ** 2
    assert (v >= v_true * (1 - 2**-16)).all()                  # ceil: never below the true v
    assert (v / v_true)[large].max() < 1.033                   # and at most a level above


@pytest.mark.parametrize("dev", on_devices([()], [()]), indirect=["dev"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_stochastic_codes_are_unbiased_within_a_level_and_v_never_decodes_to_zero(dev, backend):
    # beta1 = beta2 = 0: the stored moments are this step's g and |g|, rounded stochastically.
    gen = torch.Generator(device=dev).manual_seed(7)
    n = 2 * QBLOCK
    g = torch.randn(n, device=dev, generator=gen) * torch.logspace(-7, 0, n, device=dev)
    code_m, code_v = [], []
    for seed in range(64):
        state = init_adamw8bit_state(torch.zeros(n, device=dev))
        adamw8bit_step(torch.zeros(n, device=dev), g, state, step=1, lr=1e-3, beta1=0.0, beta2=0.0,
                       seed=seed, backend=backend)
        code_m.append(state["m_q"].float().abs())
        code_v.append(state["v_q"].float())
        assert (state["v_q"] > 0).all()                       # g != 0 everywhere: v > 0 -> code >= 1
    nb = n // QBLOCK
    scale = g.abs().view(nb, QBLOCK).amax(1).repeat_interleave(QBLOCK)
    x_m = 127 * (g.abs() / scale).sqrt()                      # the exact (real-valued) codes
    x_v = 255 * (g.abs() / scale).sqrt()
    code_m, code_v = torch.stack(code_m), torch.stack(code_v)
    assert ((code_m - x_m).abs() < 1).all()                   # each draw is one of the two levels
    assert ((code_v - x_v.clamp(min=1)).abs() < 1).all()
    # The mean over 64 draws is the exact code (a draw's spread is at most 1/2: 4 sigma ~ 0.25).
    assert (code_m.mean(0) - x_m).abs().max() < 0.25
    big = x_v >= 1
    assert (code_v.mean(0) - x_v)[big].abs().max() < 0.25
    assert (code_m.std(0) > 0).any()                          # it is random


@pytest.mark.parametrize("dev", on_devices([()], [()]), indirect=["dev"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rows_without_gradient_keep_their_codes_while_they_decay(dev, backend):
    # Rows of 512: whole blocks that only decay. Their codes must stay: fp32 noise at an exact
    # level must not ratchet v up through the ceil (an embedding's rare tokens live like this).
    gen = torch.Generator(device=dev).manual_seed(6)
    p = torch.zeros(6, 2 * QBLOCK, device=dev)
    state = init_adamw8bit_state(p)
    g = torch.randn(p.shape, device=dev, generator=gen) * torch.logspace(-3, 0, 2 * QBLOCK, device=dev)
    adamw8bit_step(p, g, state, step=1, backend=backend, stochastic_rounding=False, **HP)
    codes = state["m_q"].clone(), state["v_q"].clone()
    for step in range(2, 42):
        rows = torch.tensor([0], device=dev)
        adamw8bit_step(p, (rows, torch.randn(1, 2 * QBLOCK, device=dev, generator=gen)), state, step=step,
                       backend=backend, stochastic_rounding=False, **HP)
    quiet = slice(2 * QBLOCK, None)   # rows 1..5
    assert torch.equal(state["v_q"][quiet], codes[1][quiet])
    assert torch.equal(state["m_q"][quiet], codes[0][quiet])
    assert not torch.equal(state["v_q"][: 2 * QBLOCK], codes[1][: 2 * QBLOCK])


@pytest.mark.parametrize("dev", on_devices([()], [()]), indirect=["dev"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_stochastic_rounding_lands_tiny_updates_on_average(dev, backend):
    # 20 updates of lr 2e-4 to a weight of 1.0: together one bf16 ulp below 1.0 (2^-8), each far
    # below half of it, so round-to-nearest never moves the weight.
    n, lr, steps = 64 * QBLOCK, 2e-4, 20
    ones = torch.ones(n, device=dev)
    final = {}
    for label, dtype, sr in (("fp32", F32, False), ("sr", BF16, True), ("nearest", BF16, False)):
        p = torch.ones(n, device=dev, dtype=dtype)
        state = init_adamw8bit_state(p)
        for step in range(1, steps + 1):
            adamw8bit_step(p, ones, state, step=step, lr=lr, stochastic_rounding=sr, seed=step,
                           backend="torch" if dtype == F32 else backend)
        final[label] = 1.0 - p.float().mean().item()
    assert final["fp32"] == pytest.approx(steps * lr, rel=1e-3)
    assert final["sr"] == pytest.approx(final["fp32"], rel=0.03)
    assert final["nearest"] == 0.0


@pytest.mark.parametrize("dev", on_devices([()], [()]), indirect=["dev"])
def test_stochastic_rounding_is_reproducible_for_a_seed(dev):
    p0 = torch.randn(5, 300, device=dev).to(BF16)
    g = torch.randn(5, 300, device=dev)

    def run(seed):
        p, state = p0.clone(), init_adamw8bit_state(p0)
        adamw8bit_step(p, g, state, step=1, lr=1e-3, seed=seed, backend="triton")
        return p

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_unsupported_inputs_raise_with_the_fix():
    state = init_adamw8bit_state(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        adamw8bit_step(torch.zeros(4, 8, dtype=torch.float16), torch.zeros(4, 8), state, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="2-D param"):
        adamw8bit_step(torch.zeros(32), (torch.tensor([1]), torch.ones(1, 32)),
                       init_adamw8bit_state(torch.zeros(32)), step=1, lr=1e-3)
    with pytest.raises(ValueError, match="init_adamw8bit_state"):
        adamw8bit_step(torch.zeros(5, 8), torch.zeros(5, 8), state, step=1, lr=1e-3)


@pytest.mark.gpu
def test_the_step_seed_does_not_trigger_recompiles():
    """Triton specialises integer arguments divisible by 16 (and == 1); the per-step seed must not
    be, or the first such seed compiles a second variant in the middle of a run."""
    from cpt_studio.kernels.adamw8bit import _adamw8bit_kernel

    p = torch.zeros(4, QBLOCK, device="cuda", dtype=torch.bfloat16)
    state = init_adamw8bit_state(p)
    g = torch.ones_like(p)
    def compiled() -> set:
        return {key for cache in _adamw8bit_kernel.device_caches.values() for key in cache[0]}

    adamw8bit_step(p, g, state, step=1, lr=1e-3, seed=3)
    torch.cuda.synchronize()
    before = compiled()
    for step, seed in enumerate((16, 1, 32, 17, 2**30), start=2):
        adamw8bit_step(p, g, state, step=step, lr=1e-3, seed=seed)
    new = compiled() - before
    assert not new, f"variants compiled after the first step: {sorted(map(str, new))}"
