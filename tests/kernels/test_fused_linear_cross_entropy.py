"""Fused linear + cross-entropy vs the plain unchunked PyTorch loss: loss, dX, dW, dA, dB."""
from __future__ import annotations

import pytest
import torch

from cpt_studio.kernels import dispatch
from cpt_studio.kernels.fused_linear_cross_entropy import (
    default_chunk_rows, fused_linear_cross_entropy, linear_cross_entropy_reference)
from kernel_cases import TOL, on_devices, rel_err

F32, BF16 = torch.float32, torch.bfloat16
LOSS_TOL = {F32: 1e-5, BF16: 5e-3}
# (rows N, hidden H, vocab V, dtype, chunk rows, head): head "full" = trainable W,
# "lora" = trainable W + LoRA, "frozen+lora" = frozen W + LoRA (peft lora.Linear on lm_head)
CPU = [(6, 32, 431, F32, None, "full"), (42, 32, 431, BF16, 16, "full"),
       (123, 24, 5000, F32, 64, "full"), (42, 32, 431, F32, 16, "lora"),
       (42, 32, 431, BF16, 16, "frozen+lora")]
GPU = [(8192, 1024, 32007, BF16, None, "full"), (4096, 2048, 128256, BF16, None, "frozen+lora"),
       (123, 4096, 431, F32, 64, "lora"), (2047, 512, 50257, F32, 512, "full")]


def _inputs(n, h, v, dtype, head, dev, rank=8):
    torch.manual_seed(n + v)
    x = torch.randn(n, h, device=dev).to(dtype)
    w = (torch.randn(v, h, device=dev) / h ** 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device=dev)
    labels[torch.rand(n, device=dev) < 0.2] = -100
    labels[-1] = -100  # the shifted last position
    lora = None
    if "lora" in head:
        a = torch.randn(rank, h, device=dev) / h ** 0.5  # fp32 adapter, as peft keeps it
        b = torch.randn(v, rank, device=dev) * 0.1
        lora = (a, b)
    return x, w, labels, lora


def _loss_and_grads(fn, x, w, labels, lora, train_w, upcast=False):
    leaves = [x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(train_w)]
    if lora is not None:
        leaves += [t.detach().clone().requires_grad_() for t in lora]
    if upcast:
        leaves = [t.float().detach().requires_grad_(t.requires_grad) for t in leaves]
    kw = {} if lora is None else dict(lora_A=leaves[2], lora_B=leaves[3], lora_scaling=2.0)
    loss = fn(leaves[0], leaves[1], labels, **kw)
    loss.backward()
    return loss, [t.grad for t in leaves if t.requires_grad]


@pytest.mark.parametrize("dev,n,h,v,dtype,chunk,head", on_devices(CPU, GPU), indirect=["dev"])
def test_fused_linear_cross_entropy_matches_reference(dev, n, h, v, dtype, chunk, head):
    x, w, labels, lora = _inputs(n, h, v, dtype, head, dev)
    train_w = head != "frozen+lora"
    got_loss, got = _loss_and_grads(
        lambda *a, **k: fused_linear_cross_entropy(*a, chunk_rows=chunk, backend="triton", **k),
        x, w, labels, lora, train_w)
    ref_loss, ref = _loss_and_grads(linear_cross_entropy_reference, x, w, labels, lora, train_w, upcast=True)
    assert got_loss.dtype == F32 and torch.isfinite(got_loss)
    assert rel_err(got_loss, ref_loss) < LOSS_TOL[dtype]
    names = ["dX"] + (["dW"] if train_w else []) + (["dA", "dB"] if lora else [])
    assert len(got) == len(ref) == len(names)
    for name, g, r in zip(names, got, ref):
        assert g.shape == r.shape, name
        assert rel_err(g, r) < TOL[dtype] * (2 if dtype == BF16 else 1), name


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU interpreter check; gpu-marked tests cover CUDA"))])
def test_chunked_paths_agree_and_scale_with_grad_output(backend):
    """Chunked (3 chunks, the last partial) = unchunked; backward scales by grad_output."""
    assert backend == "torch" or dispatch.TRITON_INTERPRETED, "Triton's interpreter is off on CPU"
    x, w, labels, lora = _inputs(42, 16, 431, F32, "lora", "cpu")
    fused = lambda *a, **k: 2.5 * fused_linear_cross_entropy(*a, chunk_rows=16, backend=backend, **k)  # noqa: E731
    plain = lambda *a, **k: 2.5 * linear_cross_entropy_reference(*a, **k)  # noqa: E731
    (got_loss, got), (ref_loss, ref) = (_loss_and_grads(f, x, w, labels, lora, True) for f in (fused, plain))
    assert rel_err(got_loss, ref_loss) < 1e-6
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(got, ref))


def test_all_ignored_gives_zero_loss_and_zero_grads():
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(431, 8, requires_grad=True)
    loss = fused_linear_cross_entropy(x, w, torch.full((6,), -100), backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any() and not w.grad.any()


def test_no_grad_gives_the_same_loss_without_a_graph():
    x, w, labels, _ = _inputs(42, 16, 431, F32, "full", "cpu")
    with torch.no_grad():
        loss = fused_linear_cross_entropy(x, w.requires_grad_(), labels, chunk_rows=8, backend="torch")
    assert loss.grad_fn is None
    assert rel_err(loss, linear_cross_entropy_reference(x, w, labels)) < 1e-6


@pytest.mark.parametrize("dev", on_devices([()], [()]), indirect=["dev"])
def test_autocast_with_fp32_weight(dev):
    """fp32 weight under bf16 autocast (matmuls in bf16, dW accumulated in fp32)."""
    x, w, labels, _ = _inputs(42 if dev == "cpu" else 1024, 32, 431, F32, "full", dev)
    results = []
    for fn in (lambda *a: fused_linear_cross_entropy(*a, chunk_rows=16, backend="triton"),
               linear_cross_entropy_reference):
        with torch.autocast(dev, dtype=BF16):
            results.append(_loss_and_grads(fn, x, w, labels, None, True))
    (got_loss, got), (ref_loss, ref) = results
    assert got[1].dtype == F32  # dW in the weight's dtype
    assert rel_err(got_loss, ref_loss) < LOSS_TOL[BF16]
    assert all(rel_err(g, r) < 2 * TOL[BF16] for g, r in zip(got, ref))


def test_default_chunk_rows_bounds_the_logits_chunk():
    assert default_chunk_rows(8192, 128256, 2) == 2048  # 2048 x 128256 x 2 B = 501 MiB
    assert default_chunk_rows(8192, 128256, 4) == 1024
    assert default_chunk_rows(10, 128256) == 10
    assert default_chunk_rows(8192, 32000, 4) == 4096


@pytest.mark.parametrize("dev,dtype", on_devices([(F32,), (BF16,)], [(BF16,)]), indirect=["dev"])
def test_deferred_weight_grad_is_the_same_and_arrives_after_the_layers(dev, dtype):
    """DeferredWeightGrad: dW computed when the backward reaches the attached node (after every
    "layer" between it and the loss), bit for bit the dW of the forward-time computation, scaled
    by the loss's incoming gradient and added to an existing .grad."""
    from cpt_studio.kernels.deferred_weight_grad import DeferredWeightGrad

    n, h, v = 42, 32, 431
    x, w, labels, _ = _inputs(n, h, v, dtype, "full", dev)
    layer = torch.randn(h, h, device=dev).to(dtype) / h ** 0.5   # a stand-in for the decoder body

    def run(defer):
        emb = x.detach().clone().requires_grad_()
        weight = w.detach().clone().requires_grad_()
        weight.grad = torch.full_like(weight, 0.5)                # a previous micro-batch's grad
        deferred = DeferredWeightGrad() if defer else None
        start = deferred.attach(emb) if defer else emb
        hidden = torch.tanh(start @ layer)
        seen = {}
        hidden.register_hook(lambda g: seen.update(grad_at_layer=weight.grad.clone()))
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=16, deferred=deferred)
        (loss * 0.25).backward()
        return loss.detach(), emb.grad, weight.grad, seen["grad_at_layer"]

    loss, dx, dw, during = run(False)
    loss_d, dx_d, dw_d, during_d = run(True)
    assert torch.equal(loss, loss_d) and torch.equal(dx, dx_d) and torch.equal(dw, dw_d)
    assert not torch.equal(during, torch.full_like(during, 0.5))       # usual: dW already there
    assert torch.equal(during_d, torch.full_like(during_d, 0.5))       # deferred: not yet


def test_deferred_weight_grad_steps_aside_without_a_trainable_head():
    from cpt_studio.kernels.deferred_weight_grad import DeferredWeightGrad

    x, w, labels, lora = _inputs(42, 32, 431, F32, "frozen+lora", "cpu")
    emb = x.clone().requires_grad_()
    deferred = DeferredWeightGrad()
    a, b = (t.clone().requires_grad_() for t in lora)
    loss = fused_linear_cross_entropy(deferred.attach(emb) * 1.0, w, labels, lora_A=a, lora_B=b,
                                      deferred=deferred, backend="torch")
    loss.backward()
    assert deferred.saved is None and w.grad is None and a.grad is not None and emb.grad is not None
