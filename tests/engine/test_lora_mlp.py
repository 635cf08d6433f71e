"""engine/lora_mlp.py: a 4-bit LoRA MLP's gate, up and SwiGLU as one function (kernels.lora_swiglu).

A tiny 4-bit Llama (tests/conftest.py's quant_model_dir) with peft LoRA on every projection,
gradient checkpointing on: the fully patched model (apply_kernels) against peft's own forward
and against the patch with the gate/up pair left unfused; loss and every trainable gradient.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from test_lora_forward import _ids, _load_4bit, _peft_on, graph_nodes  # noqa: E402  (shared helpers)

from cpt_studio.engine import lora_mlp  # noqa: E402
from cpt_studio.engine.patching import apply_kernels  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def fused_pair_on(monkeypatch):
    """Off in training (lora_mlp.ENABLED, see its docstring); on for these tests."""
    monkeypatch.setattr(lora_mlp, "ENABLED", True)


def _step(model, loss_fn, autocast=False, device="cpu"):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn()
    fused = graph_nodes(loss, "GateUpSwiGLU4bitFunctionBackward")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, fused


def _patched_step(model, ids, autocast=False, device="cpu"):
    patch = apply_kernels(model, True)
    try:
        return _step(model, lambda: patch.loss(model, ids, ids), autocast, device)
    finally:
        patch.revert()


def _assert_close(got, ref, rtol, atol):
    torch.testing.assert_close(got[0], ref[0], rtol=rtol, atol=atol)
    assert got[1].keys() == ref[1].keys() and sum("lora_A" in n for n in got[1]) == 14
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=rtol, atol=atol, msg=name)


def _worst_rel_err(got, ref) -> float:
    """The largest relative-norm difference of the loss and any trainable gradient."""
    assert got[1].keys() == ref[1].keys()
    errs = [abs(got[0].item() - ref[0].item()) / abs(ref[0].item())]
    errs += [((got[1][n] - ref[1][n]).norm() / ref[1][n].norm()).item() for n in ref[1]]
    return max(errs)


def test_fused_gate_up_matches_peft_in_fp32(quant_model_dir):
    torch.manual_seed(0)   # the LoRA init (random B) does not depend on the tests run before
    model = _peft_on(_load_4bit(quant_model_dir))
    ids = _ids()
    ref = _step(model, lambda: model(input_ids=ids, labels=ids).loss)
    got = _patched_step(model, ids)
    assert got[2] == model.config.num_hidden_layers      # one node per MLP
    _assert_close(got, ref, 1e-5, 1e-6)


def _fused_and_unfused_against_peft_in_bf16(model, ids, device, monkeypatch):
    """(worst error fused vs peft, worst error unfused vs peft) under bf16 autocast."""
    ref = _step(model, lambda: model(input_ids=ids, labels=ids).loss, True, device)
    fused = _patched_step(model, ids, True, device)
    assert fused[2] == model.config.num_hidden_layers
    monkeypatch.setattr(lora_mlp, "ENABLED", False)
    unfused = _patched_step(model, ids, True, device)
    return _worst_rel_err(fused, ref), _worst_rel_err(unfused, ref)


def test_fused_gate_up_under_bf16_autocast_is_as_close_to_peft_as_the_unfused_patch(
        quant_model_dir, monkeypatch):
    """Under bf16 every kernel of the patch rounds differently from transformers' ops (and Triton's
    interpreter truncates where CUDA rounds): the whole patch lands a few % from peft in the
    worst gradient of this tiny model. The fused pair must not add to that."""
    torch.manual_seed(0)
    model = _peft_on(_load_4bit(quant_model_dir))
    fused, unfused = _fused_and_unfused_against_peft_in_bf16(model, _ids(), "cpu", monkeypatch)
    assert fused < 1.5 * unfused + 5e-3 and fused < 0.1, (fused, unfused)


def test_fused_gate_up_matches_the_unfused_kernels(quant_model_dir, monkeypatch):
    """Same patch, gate/up left as two fused 4-bit functions + kernels.swiglu: fp32 equal to
    rounding (the kernel's per-tile products against cuBLAS-free torch addmm on CPU)."""
    model = _peft_on(_load_4bit(quant_model_dir))
    ids = _ids(seed=3)
    fused = _patched_step(model, ids)
    monkeypatch.setattr(lora_mlp, "ENABLED", False)
    unfused = _patched_step(model, ids)
    assert fused[2] == model.config.num_hidden_layers and unfused[2] == 0
    _assert_close(fused, unfused, 1e-5, 1e-6)


def test_the_function_computes_only_the_gradients_asked_for(quant_model_dir):
    """Frozen LoRA weights of the gate: no dA/dB for it, the others unchanged."""
    model = _peft_on(_load_4bit(quant_model_dir))
    ids = _ids()
    ref = _patched_step(model, ids)
    gates = [p for n, p in model.named_parameters() if "gate_proj.lora_" in n]
    for p in gates:
        p.requires_grad_(False)
    got = _patched_step(model, ids)
    assert not any("gate_proj.lora_" in n for n in got[1])
    for name, grad in got[1].items():
        torch.testing.assert_close(grad, ref[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_layers_that_are_not_both_fused_4bit_take_the_unfused_path(quant_model_dir):
    """A gate with LoRA dropout runs peft's forward: the pair is not fused, nothing breaks."""
    model = _peft_on(_load_4bit(quant_model_dir), dropout=0.0)
    ids = _ids()
    for name, module in model.named_modules():
        if name.endswith("layers.0.mlp.gate_proj"):
            module.lora_dropout["default"] = torch.nn.Dropout(0.1)
    got = _patched_step(model, ids)
    assert got[2] == model.config.num_hidden_layers - 1


@pytest.mark.gpu
def test_fused_gate_up_on_cuda_under_bf16_autocast_is_as_close_to_peft_as_the_unfused_patch(
        quant_model_dir, monkeypatch):
    """The P1 path: bf16 4-bit base, fp32 LoRA masters, bf16 autocast, compiled Triton kernels."""
    torch.manual_seed(0)
    model = _peft_on(_load_4bit(quant_model_dir, "cuda"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    fused, unfused = _fused_and_unfused_against_peft_in_bf16(model, _ids("cuda"), "cuda", monkeypatch)
    assert fused < 1.5 * unfused + 5e-3 and fused < 0.1, (fused, unfused)


def test_off_by_default_in_training(quant_model_dir, monkeypatch):
    monkeypatch.undo()
    assert lora_mlp.ENABLED is False
    model = _peft_on(_load_4bit(quant_model_dir))
    assert _patched_step(model, _ids())[2] == 0
