"""The lean LoRA forwards of engine/speed/lora_forward.py, the fused 4-bit function above all.

- LoRA4bitLinearFunction alone vs a float reference (the dequantized weight as a plain tensor):
  output and the x / A / B gradients, fp32 and bf16 compute, odd shapes, bias, double quant.
- A tiny 4-bit Llama (tests/conftest.py's quant_model_dir through load_base_model) with peft LoRA:
  the patched model against peft's own forward, loss and every trainable gradient, fp32 and under
  bf16 autocast, with non-reentrant gradient checkpointing; an eval forward first changes nothing;
  layers the function must not take (dropout, two adapters, a repacked weight) stay on peft's path.
The `gpu` tests repeat the comparisons on CUDA (pytest -m gpu on the device).
"""
from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from cpt_studio.engine.speed.lora_forward import LEAN_LABELS, LoRA4bitLinearFunction  # noqa: E402
from test_patching import _lora_layers, _lora_only_patch  # noqa: E402  (shared helpers)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FUSED = LEAN_LABELS["4bit"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- the function alone ----------------------------------------------------------------------------

def _quantized_layer(out_f, in_f, bias, nested, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32,
                              compress_statistics=nested, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f, generator=g) * 0.1, requires_grad=False,
                                     compress_statistics=nested, quant_type="nf4")
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_f, generator=g) * 0.1, requires_grad=False)
    return layer.to(device)  # quantizes


def _function_vs_reference(device, dtype, n, in_f, out_f, r, bias, nested, needs_x=True):
    layer = _quantized_layer(out_f, in_f, bias, nested, device)
    qs = layer.weight.quant_state
    assert qs.nested == nested
    w = bnb.functional.dequantize_4bit(layer.weight.data, qs).float()   # the reference's weight
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, in_f, generator=g).to(device).requires_grad_(needs_x)
    lora_a = torch.randn(r, in_f, generator=g).mul(0.2).to(device).requires_grad_()
    lora_b = torch.randn(out_f, r, generator=g).mul(0.2).to(device).requires_grad_()
    dy = torch.randn(n, out_f, generator=g).to(device)
    s = 1.5
    bias_t = layer.bias.detach() if bias else None

    y = LoRA4bitLinearFunction.apply(x, layer.weight.data, qs, layer.bias, lora_a, lora_b, s, dtype)
    grads = torch.autograd.grad(y, [x, lora_a, lora_b] if needs_x else [lora_a, lora_b], dy)

    # float64 reference on the same (compute-dtype rounded) operands
    rd = lambda t: t.detach().to(dtype).double()  # noqa: E731
    xr, ar, br = (rd(t).requires_grad_() for t in (x, lora_a, lora_b))
    ref = xr @ rd(w).t() + s * (xr @ ar.t()) @ br.t()
    if bias:
        ref = ref + rd(bias_t)
    ref_grads = torch.autograd.grad(ref, [xr, ar, br] if needs_x else [ar, br], rd(dy))
    return y, ref, grads, ref_grads, (x, lora_a, lora_b)


def _assert_close(got, want, dtype):
    """fp32: elementwise. bf16/fp16: against the tensor's scale (sums of rounded products cancel)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-2 * want.abs().max().item(), (err, want.abs().max().item())


@pytest.mark.parametrize("n,in_f,out_f,r,bias,nested", [
    (6, 64, 192, 4, False, True), (6, 64, 192, 4, True, False), (1, 128, 64, 8, False, True),
    (37, 192, 128, 3, True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_function_matches_a_float_reference(n, in_f, out_f, r, bias, nested, dtype):
    y, ref, grads, ref_grads, (x, lora_a, lora_b) = _function_vs_reference(
        "cpu", dtype, n, in_f, out_f, r, bias, nested)
    assert y.shape == (n, out_f) and y.dtype == x.dtype  # Linear4bit returns its input's dtype
    _assert_close(y, ref, dtype)
    for got, want, like in zip(grads, ref_grads, (x, lora_a, lora_b)):
        assert got.dtype == like.dtype and got.shape == like.shape  # fp32 master-weight grads
        _assert_close(got, want, dtype)


def test_function_computes_only_the_gradients_asked_for():
    """x without requires_grad (the first layer's input): dx is neither computed nor returned."""
    y, ref, grads, ref_grads, _ = _function_vs_reference("cpu", torch.float32, 6, 64, 192, 4, False, True,
                                                         needs_x=False)
    assert y.grad_fn is not None and y.grad_fn.next_functions[0][0] is None  # nothing flows into x
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_function_takes_any_leading_shape_and_its_output_can_be_modified_in_place():
    """[B, T, in] in, [B, T, out] out (flattened inside: no view nodes), and not a view: an in-place
    op downstream (a residual `+=`) works, as on peft's output."""
    layer = _quantized_layer(192, 64, False, True, "cpu")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, generator=g, requires_grad=True)
    a = torch.randn(4, 64, generator=g, requires_grad=True)
    b = torch.randn(192, 4, generator=g, requires_grad=True)
    args = (layer.weight.data, layer.weight.quant_state, None, a, b, 2.0, torch.float32)
    y = LoRA4bitLinearFunction.apply(x, *args)
    assert y.shape == (2, 3, 192) and not y._is_view()
    y.mul_(3).sum().backward()
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    (LoRA4bitLinearFunction.apply(x.reshape(6, 64), *args) * 3).sum().backward()
    for got, t in zip(grads, (x, a, b)):
        torch.testing.assert_close(got, t.grad)


def test_function_saves_no_weight_and_no_output():
    """Only x, h [N, r] and the cast LoRA factors are kept between forward and backward."""
    layer = _quantized_layer(192, 64, False, True, "cpu")
    x = torch.randn(6, 64, requires_grad=True)
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(192, 4, requires_grad=True)
    y = LoRA4bitLinearFunction.apply(x, layer.weight.data, layer.weight.quant_state, None, a, b, 2.0,
                                     torch.float32)
    shapes = sorted(tuple(t.shape) for t in y.grad_fn.saved_tensors)
    assert shapes == sorted([(6, 64), (6, 4), (4, 64), (192, 4)])


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


def test_apply_kernels_reports_the_fused_4bit_layers(quant_model_dir):
    from cpt_studio.engine.speed.patching import apply_kernels

    model = _peft_on(_load_4bit(quant_model_dir))
    patch = apply_kernels(model, enabled=True)
    try:
        assert f"{FUSED}: 14 modules" in patch.summary()
    finally:
        patch.revert()
    assert not any("forward" in m.__dict__ for m in model.modules())


# --- CUDA ---------------------------------------------------------------------------------------------

@pytest.fixture
def cuda_backward_thread():
    """The first cuBLAS call on autograd's CUDA worker thread warns that the thread had no current
    context (torch then sets it): run one before, so the warning is not charged to the function."""
    a = torch.ones(2, 2, device="cuda", requires_grad=True)
    torch.mm(a, a).sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_function_matches_a_float_reference_on_cuda(dtype, cuda_backward_thread):
    y, ref, grads, ref_grads, (x, lora_a, lora_b) = _function_vs_reference(
        "cuda", dtype, 37, 192, 128, 3, True, True)
    _assert_close(y, ref, dtype)  # TF32 is off by default for matmuls
    for got, want, like in zip(grads, ref_grads, (x, lora_a, lora_b)):
        assert got.dtype == like.dtype
        _assert_close(got, want, dtype)


@pytest.mark.gpu
def test_4bit_fused_on_cuda_under_bf16_autocast_matches_peft(quant_model_dir):
    """The P1 path: bf16 4-bit base (compute dtype bf16), fp32 LoRA masters, bf16 autocast."""
    model = _peft_on(_load_4bit(quant_model_dir, "cuda"))
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    _compare(model, rtol=3e-2, atol=3e-3, autocast=True, device="cuda")
