"""engine/speed/lora_group.py: q/k/v and gate/up of a 4-bit LoRA model as one autograd function each.

The tiny 4-bit Llama of tests/conftest.py with peft LoRA on every projection, patched with the
fused 4-bit forwards (engine.speed.lora_forward) and then grouped: loss and every trainable gradient
against peft's own forward and against the same patch ungrouped; a member called with another
input, unused outputs, gradients only where asked, project_value_unused on a member, revert.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from cpt_studio.engine.speed import lora_group  # noqa: E402
from cpt_studio.engine.speed.lora_forward import GROUP_ATTR, project_value_unused  # noqa: E402
from cpt_studio.engine.speed.registry import KERNEL_TRANSFORMS, apply_transforms  # noqa: E402
from test_lora_forward import _ids, _load_4bit, _peft_on, _step, graph_nodes  # noqa: E402
from test_patching import _lora_only_patch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GROUPED = "LoRA4bitGroupFunctionBackward"
SINGLE = "LoRA4bitLinearFunctionBackward"


def _grouped_patch(model):
    return apply_transforms(model, ["lora_forwards", "lora_groups"])


def _nodes(model, ids, autocast=False, device="cpu"):
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    return graph_nodes(loss, GROUPED), graph_nodes(loss, SINGLE)


def _attention(model, layer=0):
    return model.base_model.model.model.layers[layer].self_attn


def _compare_grouped(model, rtol, atol, autocast=False, device="cpu"):
    """peft's forward, the fused patch ungrouped, then grouped: the grouped loss and gradients
    as peft's within rtol / atol; returns the grouped and the ungrouped results."""
    ids = _ids(device)
    ref_loss, ref, _ = _step(model, ids, autocast, device)
    patch = _lora_only_patch(model)
    try:
        flat_loss, flat, _ = _step(model, ids, autocast, device)
    finally:
        patch.revert()
    patch = _grouped_patch(model)
    try:
        assert patch.counts[lora_group.LABEL] == 10   # 2 layers x (q, k, v, gate, up)
        assert _nodes(model, ids, autocast, device) == (4, 4)   # o_proj and down_proj alone
        got_loss, got, _ = _step(model, ids, autocast, device)
    finally:
        patch.revert()
    assert not any(GROUP_ATTR in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    assert got.keys() == ref.keys() and sum("lora_A" in n for n in got) == 14
    torch.testing.assert_close(got_loss, ref_loss, rtol=rtol, atol=atol)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    return (got_loss, got), (flat_loss, flat)


def test_grouped_fp32_matches_peft_and_the_ungrouped_patch(quant_model_dir):
    model = _peft_on(_load_4bit(quant_model_dir))
    (got_loss, got), (flat_loss, flat) = _compare_grouped(model, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_loss, flat_loss, rtol=1e-6, atol=1e-7)
    for name in flat:   # fp32: only the summation order differs
        torch.testing.assert_close(got[name], flat[name], rtol=1e-5, atol=1e-7, msg=name)


def test_grouped_under_bf16_autocast_matches_peft(quant_model_dir):
    model = _peft_on(_load_4bit(quant_model_dir))
    # bf16: each grouped output is rounded once (LoRA term inside the GEMM), peft's twice; one
    # gradient element of 256 moved by 0.0049 (a bf16 step at that size) against 3e-3 before
    _compare_grouped(model, rtol=3e-2, atol=6e-3, autocast=True)


def test_grouped_without_checkpointing_matches_peft(quant_model_dir):
    model = _peft_on(_load_4bit(quant_model_dir), checkpointing=False)
    _compare_grouped(model, rtol=1e-5, atol=1e-6)


def test_a_member_called_with_another_input_computes_on_its_own(quant_model_dir):
    model = _peft_on(_load_4bit(quant_model_dir))
    attn = _attention(model)
    g = torch.Generator().manual_seed(3)
    x, other = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    patch = _lora_only_patch(model)
    want = [attn.q_proj(x), attn.k_proj(other), attn.v_proj(x)]
    patch.revert()
    patch = _grouped_patch(model)
    try:
        q = attn.q_proj(x)                     # computes q, k, v for x
        group = attn.q_proj.__dict__[GROUP_ATTR][0]
        assert group._x is x
        k = attn.k_proj(other)                 # not x: its own function; the kept k, v dropped
        assert group._x is None and group._kept == []
        v = attn.v_proj(x)                     # nothing kept: its own function too
    finally:
        patch.revert()
    for got, w in zip((q, k, v), want):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)
    assert [type(t.grad_fn).__name__ for t in (q, k, v)] == [GROUPED, SINGLE, SINGLE]


def test_unused_outputs_and_frozen_factors_get_no_gradient(quant_model_dir):
    """Only q is used and k's LoRA B is frozen: q's factors get gradients equal to the ungrouped
    patch's, k and v's B none (their outputs carried no gradient), k and v's A zero rows."""
    model = _peft_on(_load_4bit(quant_model_dir))
    attn = _attention(model)
    attn.k_proj.lora_B["default"].weight.requires_grad_(False)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    params = {n: m.lora_A["default"].weight for n, m in (("q", attn.q_proj), ("k", attn.k_proj))}
    params["qB"] = attn.q_proj.lora_B["default"].weight

    def grads(grouped: bool):
        patch = _grouped_patch(model) if grouped else _lora_only_patch(model)
        try:
            q = attn.q_proj(x)
            attn.k_proj(x), attn.v_proj(x)
            return torch.autograd.grad(q.square().sum(), [x, *params.values()], allow_unused=True)
        finally:
            patch.revert()

    flat, grouped = grads(False), grads(True)
    for name, a, b in zip(["x", *params], flat, grouped):
        if name == "k":   # ungrouped: k's output is not in the graph at all; grouped: zero rows
            assert a is None and torch.count_nonzero(b) == 0
        else:
            assert a is not None and b is not None, (name, a, b)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)   # fp32, another sum order


def test_a_value_unused_member_runs_alone(quant_model_dir):
    model = _peft_on(_load_4bit(quant_model_dir))
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(5))
    patch = _grouped_patch(model)
    try:
        gate = project_value_unused(mlp.gate_proj, x)   # the single function's skip, no group
        assert type(gate.grad_fn).__name__ == SINGLE and torch.count_nonzero(gate) == 0
        assert mlp.gate_proj.__dict__[GROUP_ATTR][0]._kept == []
    finally:
        patch.revert()


def test_apply_kernels_groups_by_default_and_reports_it(quant_model_dir):
    from cpt_studio.engine.speed.registry import apply_kernels

    model = _peft_on(_load_4bit(quant_model_dir))
    patch = apply_kernels(model, enabled=True)
    try:
        assert f"{lora_group.LABEL}: 10 modules" in patch.summary()
    finally:
        patch.revert()
    patch = apply_transforms(model, [n for n in KERNEL_TRANSFORMS if n != "lora_groups"])
    try:
        assert not any(lora_group.LABEL in line for line in patch.summary())
    finally:
        patch.revert()


def _rel_errors(got: dict, want: dict) -> dict:
    return {n: ((got[n].double() - want[n].double()).norm() / want[n].double().norm()).item()
            for n in want}


@pytest.mark.gpu
def test_grouped_on_cuda_in_fp32_matches_the_ungrouped_patch(quant_model_dir):
    """fp32 all through on CUDA (Triton dequantize, cuBLAS with strided operands): grouped and
    ungrouped may differ in summation order only. Against peft loosely: on CUDA the 4-bit layers
    keep quant_state.dtype bf16, so peft's path rounds each dequantized weight to bf16 first."""
    model = _peft_on(_load_4bit(quant_model_dir, "cuda"))
    for m in model.modules():
        if hasattr(m, "compute_dtype"):
            m.compute_dtype = torch.float32
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.float()
    (got_loss, got), (flat_loss, flat) = _compare_grouped(model, rtol=2e-2, atol=2e-3, device="cuda")
    torch.testing.assert_close(got_loss, flat_loss, rtol=1e-5, atol=1e-6)
    errors = _rel_errors(got, flat)
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.gpu
def test_grouped_on_cuda_under_bf16_autocast_is_as_close_to_peft_as_the_ungrouped_patch(
        quant_model_dir):
    """The P1 path: bf16 4-bit base, fp32 LoRA masters, bf16 autocast, on CUDA. bf16 rounding
    makes single elements of small gradients differ by more than an elementwise tolerance from
    peft's (as the ungrouped patch's do, in other places); per parameter, the grouped patch's
    relative error against peft must stay within that of the ungrouped patch."""
    model = _peft_on(_load_4bit(quant_model_dir, "cuda"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ids = _ids("cuda")
    _, ref, _ = _step(model, ids, True, "cuda")
    results = []
    for make in (_lora_only_patch, _grouped_patch):
        patch = make(model)
        try:
            results.append(_step(model, ids, True, "cuda")[1])
        finally:
            patch.revert()
    flat, grouped = (_rel_errors(r, ref) for r in results)
    worse = {n: (grouped[n], flat[n]) for n in ref if grouped[n] > 1.5 * flat[n] + 5e-3}
    assert not worse, worse
    assert max(grouped.values()) < 0.1, grouped
