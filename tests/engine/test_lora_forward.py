"""The lean LoRA forwards of engine/speed/lora_forward.py, the fused 4-bit function above all.

The function alone (kernels.lora_4bit_linear vs its reference) is tests/kernels/test_lora_4bit.py.
Here, a tiny 4-bit Llama (tests/conftest.py's quant_model_dir through load_base_model) with peft
LoRA: the patched model against peft's own forward, loss and every trainable gradient, fp32 and
under bf16 autocast, with non-reentrant gradient checkpointing; an eval forward first changes
nothing; layers the function must not take (dropout, two adapters, a repacked weight) stay on
peft's path; project_value_unused skips the value of a fused layer only.
The `gpu` tests repeat the comparisons on CUDA (pytest -m gpu on the device).
"""
from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from cpt_studio.engine.speed.lora_forward import LEAN_LABELS, project_value_unused  # noqa: E402
from test_patching import _lora_layers, _lora_only_patch  # noqa: E402  (shared helpers)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FUSED = LEAN_LABELS["4bit"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- a 4-bit model with peft LoRA, patched vs peft's forward ------------------------------------------

def _load_4bit(quant_model_dir, device="cpu"):
    from cpt_studio.engine.model.loading import load_base_model
    from cpt_studio.engine.model.source import ResolvedModel

    base, _ = load_base_model(ResolvedModel("hf_folder", str(quant_model_dir), "", "q"), "4bit", device)
    return base


def _peft_on(base, dropout=0.0, checkpointing=True):
    from peft import LoraConfig, get_peft_model

    if checkpointing:  # as P1
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(r=4, lora_alpha=6, lora_dropout=dropout, init_lora_weights=False,  # random B: real grads
                     target_modules=TARGETS)
    model = get_peft_model(base, cfg)
    model.train()
    return model


def _ids(device="cpu", seed=0):
    return torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(seed)).to(device)


def graph_nodes(loss, name: str) -> int:
    """How many nodes of type `name` the loss's autograd graph holds."""
    seen, stack, count = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        stack.extend(n for n, _ in node.next_functions)
    return count


def _fused_nodes(loss):
    """How many LoRA4bitLinearFunction nodes the loss's graph holds (the fused path was taken)."""
    return graph_nodes(loss, "LoRA4bitLinearFunctionBackward")


def _step(model, ids, autocast=False, device="cpu"):
    """Loss, every trainable gradient, and the number of fused nodes in the graph."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    fused = _fused_nodes(loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, fused


def _compare(model, rtol, atol, autocast=False, device="cpu", expect_fused=14):
    """peft's forward, then the patched one, then reverted: same loss and gradients, exact revert."""
    ids = _ids(device)
    ref_loss, ref, fused = _step(model, ids, autocast, device)
    assert fused == 0
    originals = {id(m): type(m).forward for m in _lora_layers(model)}
    patch = _lora_only_patch(model)
    try:
        got_loss, got, fused = _step(model, ids, autocast, device)
    finally:
        patch.revert()
    back_loss, back, _ = _step(model, ids, autocast, device)
    assert fused == expect_fused
    torch.testing.assert_close(got_loss, ref_loss, rtol=rtol, atol=atol)
    assert got.keys() == ref.keys() and sum("lora_A" in n for n in got) == 14
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=atol, msg=name)
    assert torch.equal(back_loss, ref_loss) and all(torch.equal(back[n], ref[n]) for n in ref)
    for m in _lora_layers(model):  # revert: peft's own forward again
        assert "forward" not in m.__dict__ and type(m).forward is originals[id(m)]


def test_4bit_fused_fp32_matches_peft_loss_and_every_gradient(quant_model_dir):
    """(Was test_patching's test_lean_lora_forward_4bit_matches_peft.)"""
    model = _peft_on(_load_4bit(quant_model_dir))
    patch = _lora_only_patch(model)
    assert patch.counts == {FUSED: 14}
    patch.revert()
    assert patch.counts == {}
    _compare(model, rtol=1e-5, atol=1e-6)


def test_4bit_fused_under_bf16_autocast_matches_peft(quant_model_dir):
    model = _peft_on(_load_4bit(quant_model_dir))
    _compare(model, rtol=3e-2, atol=3e-3, autocast=True)


def test_4bit_fused_without_checkpointing_matches_peft(quant_model_dir):
    model = _peft_on(_load_4bit(quant_model_dir), checkpointing=False)
    _compare(model, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("repacking_flag", [False, True])
def test_an_eval_forward_first_does_not_change_the_gradients(quant_model_dir, repacking_flag):
    """bnb 0.50 repacks a 4-bit weight on a no-grad eval forward on AVX512-BF16 CPUs (and gradients
    through the repacked weight came out wrong). The loader turns that off; the fused function
    never runs Linear4bit.forward, so even with bnb's flag back on nothing gets repacked."""
    model = _peft_on(_load_4bit(quant_model_dir))
    ids = _ids()
    _, ref, _ = _step(model, ids)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = repacking_flag
    patch = _lora_only_patch(model)
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=_ids(seed=1))
        model.train()
        _, got, fused = _step(model, ids)
    finally:
        patch.revert()
    assert fused == 14
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_weight_repacked_for_the_cpu_kernel_takes_peft_s_path(quant_model_dir):
    """After bnb repacked a weight (packing_format_for_cpu), dequantize_4bit cannot read it: that layer
    runs peft's forward (through Linear4bit.forward) and gives what peft gives."""
    model = _peft_on(_load_4bit(quant_model_dir))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.base_layer.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        layer.base_layer(torch.randn(1, 64))  # bnb repacks here
        assert layer.base_layer.weight.quant_state.packing_format_for_cpu
        want = model(input_ids=_ids()).logits
        patch = _lora_only_patch(model)
        try:
            got = model(input_ids=_ids()).logits
        finally:
            patch.revert()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model.train()
    patch = _lora_only_patch(model)
    try:  # no backward: bnb's repacked path has no autograd formula (the gradients it gives are wrong)
        fused = _fused_nodes(model(input_ids=_ids(), labels=_ids()).loss)
    finally:
        patch.revert()
    assert fused == 13  # every layer but the repacked one


def test_4bit_dropout_layers_are_left_as_peft(quant_model_dir):
    model = _peft_on(_load_4bit(quant_model_dir), dropout=0.1)
    patch = _lora_only_patch(model)
    try:
        assert patch.counts == {}
        assert any("LoRA layers left as peft's: 14" in n for n in patch.summary())
        assert not any("forward" in m.__dict__ for m in _lora_layers(model))
    finally:
        patch.revert()


def test_4bit_two_adapters_and_a_disabled_adapter_use_peft(quant_model_dir):
    from peft import LoraConfig

    model = _peft_on(_load_4bit(quant_model_dir))
    ids = _ids()
    patch = _lora_only_patch(model)
    try:
        with model.disable_adapter():  # adapters off at call time: peft's path (the base alone)
            loss_off, _, fused = _step(model, ids)
        assert fused == 0
    finally:
        patch.revert()
    with model.disable_adapter():
        assert torch.equal(_step(model, ids)[0], loss_off)
    model.add_adapter("second", LoraConfig(r=2, target_modules=TARGETS))
    patch = _lora_only_patch(model)
    try:
        assert patch.counts == {}
        assert any("LoRA layers left as peft's: 14" in n for n in patch.summary())
    finally:
        patch.revert()


def test_4bit_without_autocast_in_a_compute_dtype_other_than_the_lora_weights_keeps_the_lean_path(
        quant_model_dir):
    """bf16 compute, fp32 LoRA, no autocast: peft adds the LoRA product in fp32, so the lean path runs."""
    model = _peft_on(_load_4bit(quant_model_dir))
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.bfloat16
    _compare(model, rtol=2e-2, atol=2e-3, expect_fused=0)


def test_project_value_unused_skips_the_value_of_a_fused_layer_only(quant_model_dir):
    """A layer on the fused 4-bit forward returns a zero placeholder whose backward gives peft's
    gradients; a layer on peft's forward, or a call that falls back (adapters off), is module(x)."""
    model = _peft_on(_load_4bit(quant_model_dir))
    down = model.base_model.model.model.layers[0].mlp.down_proj
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, down.base_layer.in_features, generator=g, requires_grad=True)
    dy = torch.randn(2, 5, down.base_layer.out_features, generator=g)
    leaves = [x, down.lora_A["default"].weight, down.lora_B["default"].weight]
    want = project_value_unused(down, x)   # not patched: peft's forward, its value
    assert torch.equal(want, down(x))
    want_grads = torch.autograd.grad(want, leaves, dy)
    patch = _lora_only_patch(model)
    try:
        got = project_value_unused(down, x)
        with model.disable_adapter():
            assert torch.equal(project_value_unused(down, x), down(x))
    finally:
        patch.revert()
    assert type(got.grad_fn).__name__ == "LoRA4bitLinearFunctionBackward"
    assert got.shape == want.shape and torch.count_nonzero(got) == 0
    for got_grad, want_grad in zip(torch.autograd.grad(got, leaves, dy), want_grads):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5 * want_grad.abs().max().item())


def test_apply_kernels_reports_the_fused_4bit_layers(quant_model_dir):
    from cpt_studio.engine.speed.registry import apply_kernels

    model = _peft_on(_load_4bit(quant_model_dir))
    patch = apply_kernels(model, enabled=True)
    try:
        assert f"{FUSED}: 14 modules" in patch.summary()
    finally:
        patch.revert()
    assert not any("forward" in m.__dict__ for m in model.modules())


# --- CUDA ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_4bit_fused_on_cuda_under_bf16_autocast_matches_peft(quant_model_dir):
    """The P1 path: bf16 4-bit base (compute dtype bf16), fp32 LoRA masters, bf16 autocast."""
    model = _peft_on(_load_4bit(quant_model_dir, "cuda"))
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    _compare(model, rtol=3e-2, atol=3e-3, autocast=True, device="cuda")
