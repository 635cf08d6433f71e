"""engine/speed/registry.py: every model transform in one list, applied in order, undone exactly.

On a tiny Llama with LoRA on every projection, trained embed_tokens and lm_head copies and gradient
checkpointing (the CPT setup), once over nn.Linear and once over a 4-bit base: all transforms
applied give the stock loss and gradients, each transform changed what it says it applies to, and
the revert gives back the stock model bit for bit (outputs, gradients, the frozen originals that a
disabled adapter reads, no forward, hook or checkpoint function of ours left).
"""
from __future__ import annotations

import pytest
import torch

from cpt_studio.engine.speed import registry, upstream
from cpt_studio.engine.speed.registry import NAMES, TRANSFORMS, apply_transforms, plan_transforms

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cpt_model(base):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # random B
                     target_modules=TARGETS, modules_to_save=["embed_tokens", "lm_head"])
    model = get_peft_model(base, cfg)
    model.train()
    return model


def _linear_model():
    from tiny_models import build_tiny_model

    return _cpt_model(build_tiny_model("llama", vocab_size=384))


def _four_bit_model(quant_model_dir):
    pytest.importorskip("bitsandbytes")
    from test_lora_forward import _load_4bit

    return _cpt_model(_load_4bit(quant_model_dir))


def _ids():
    return torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))


def _step(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _stock_state(model, ids):
    loss, grads = _step(model, lambda: model(input_ids=ids, labels=ids, use_cache=False).loss)
    with torch.no_grad(), model.disable_adapter():   # reads the frozen originals
        frozen = model(input_ids=ids, use_cache=False).logits
    return loss, grads, frozen


def _module_state(model) -> dict:
    """Per module: an instance forward, the checkpoint function's type, the hooks, sparse, markers."""
    state = {}
    for name, m in model.named_modules():
        func = m.__dict__.get("_gradient_checkpointing_func")
        state[name] = ("forward" in m.__dict__, type(func).__name__ if func is not None else None,
                       tuple(m._forward_hooks), tuple(m._forward_pre_hooks), getattr(m, "sparse", None),
                       sorted(k for k in m.__dict__ if k.startswith("_cpt")),
                       {k: (v.stride(), v.dtype, v.device) for k, v in m._parameters.items() if v is not None})
    return state


@pytest.mark.parametrize("base", ["linear", "4bit"])
def test_every_transform_applies_and_undoes_to_the_stock_model(base, quant_model_dir, monkeypatch):
    model = _linear_model() if base == "linear" else _four_bit_model(quant_model_dir)
    ids = _ids()
    stock_loss, stock_grads, stock_frozen = _stock_state(model, ids)
    stock_modules = _module_state(model)

    from cpt_studio.engine.speed import lora_forward
    skipped = []
    real = lora_forward.project_value_unused
    monkeypatch.setattr(lora_forward, "project_value_unused",
                        lambda module, x: skipped.append(1) or real(module, x))

    surgery = apply_transforms(model, NAMES, backend="torch")
    counts = {a.name: 0 for a in surgery.applied}
    for a in surgery.applied:
        counts[a.name] += a.count
    layers = model.config.num_hidden_layers
    assert counts["rmsnorm"] == 2 * layers + 1
    assert counts["swiglu_mlp"] == layers and counts["rope"] == layers
    assert counts["lora_forwards"] == 7 * layers
    assert counts["lora_groups"] == (5 * layers if base == "4bit" else 0)
    assert counts["offload_checkpoints"] == layers
    assert counts["stream_in_compute_dtype"] == 1 and counts["sparse_embedding_grad"] == 1
    assert counts["free_frozen_embeddings"] == 2
    assert surgery.fused_loss and set(counts) == set(NAMES)

    with pytest.raises(RuntimeError, match="frozen original of embed_tokens was freed"):
        with torch.no_grad(), model.disable_adapter():
            model(input_ids=ids)
    loss, grads = _step(model, lambda: surgery.loss(model, ids, ids))
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == stock_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    # the offloaded recompute ran down_proj through the value-unused path (4-bit: the fused function)
    assert len(skipped) == layers and surgery.recompute.depth == 0

    surgery.revert()
    surgery.revert()   # twice is fine
    after = _module_state(model)
    assert [n for n in after if after[n] != stock_modules[n]] == []
    loss, grads, frozen = _stock_state(model, ids)
    assert torch.equal(loss, stock_loss) and torch.equal(frozen, stock_frozen)
    for name in grads:
        assert torch.equal(grads[name], stock_grads[name]), name


def test_applying_twice_is_refused_until_reverted():
    model = _linear_model()
    surgery = apply_transforms(model, ["rmsnorm"], backend="torch")
    with pytest.raises(RuntimeError, match="already applied"):
        apply_transforms(model, ["rope"], backend="torch")
    surgery.revert()
    apply_transforms(model, ["rope"], backend="torch").revert()


def test_the_registry_lists_each_transform_with_its_rule():
    assert len(set(NAMES)) == len(NAMES)
    for t in TRANSFORMS:
        assert t.applies_to and t.switch and callable(t.apply), t.name
        for key in t.replaces:
            assert key in upstream.KNOWN, (t.name, key)
    with pytest.raises(KeyError):
        apply_transforms(_linear_model(), ["no_such_transform"])


def test_plan_transforms_says_why_each_is_off():
    on = {t.switch: True for t in TRANSFORMS}
    choices = {c.name: c for c in plan_transforms("llama", on)}
    assert all(c.on for c in choices.values()), [c for c in choices.values() if not c.on]
    gpt2 = {c.name: c for c in plan_transforms("gpt2", on)}
    assert not gpt2["rmsnorm"].on and "architecture 'gpt2'" in gpt2["rmsnorm"].why
    assert gpt2["lora_forwards"].on and gpt2["offload_checkpoints"].on   # any architecture
    off = {c.name: c for c in plan_transforms("llama", {**on, "kernels": False}, disabled=["offload_checkpoints"])}
    assert not off["rope"].on and off["rope"].why == "off: kernels is off"
    assert not off["offload_checkpoints"].on and "disabled_transforms" in off["offload_checkpoints"].why
    assert off["stream_in_compute_dtype"].on


def test_plan_transforms_follows_the_installed_library_code(monkeypatch):
    """An RMSNorm forward whose fingerprint is unknown turns the rmsnorm transform off in the plan,
    with upstream's one-line reason."""
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states):   # a Gemma-style norm: not what our kernel computes
        return (1 + self.weight) * hidden_states

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)
    choices = {c.name: c for c in plan_transforms("llama", {"kernels": True})}
    assert not choices["rmsnorm"].on and "RMSNorm kernel off" in choices["rmsnorm"].why
    assert choices["swiglu_mlp"].on
    qwen = {c.name: c for c in plan_transforms("qwen2", {"kernels": True})}
    assert qwen["rmsnorm"].on    # another architecture's norm is still the known one


def test_apply_kernels_is_the_kernel_transforms_only():
    model = _linear_model()
    surgery = registry.apply_kernels(model, backend="torch")
    try:
        assert {a.name for a in surgery.applied} == set(registry.KERNEL_TRANSFORMS)
    finally:
        surgery.revert()


def test_an_unknown_disabled_transform_is_a_config_error():
    from cpt_studio.engine.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        plan_transforms("llama", {"kernels": True}, disabled=["ropes"])
    assert "ropes" in str(info.value.problems["training.disabled_transforms"])
