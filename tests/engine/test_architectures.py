"""Every speed transform on every model family users train: on where it applies, off with its reason
where it does not.

Each family of tests/tiny_models.py (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norms,
Gemma-2 and Gemma-3 with tied heads, (1 + weight) norms, GeGLU, scaled embeddings and soft-caps,
Phi-3 with fused qkv / gate_up projections) is set up as the engine trains it: LoRA on every
projection through engine/model/adapters.attach_adapters, embed_tokens and lm_head fully trained,
gradient checkpointing. Then:

- the registry's plan for the family turns on exactly the transforms listed in PLAN_ON, and each
  one it turns off says why, naming the architecture;
- with the plan applied, the loss and every trainable gradient equal the stock model's, and each
  module of a kind an off transform would change keeps transformers' forward;
- a kernel transform forced onto a family it does not support (apply_transforms by name, past the
  plan) leaves that family's modules and loss on the stock path, with a note saying why.

The comparisons run the PyTorch paths of the kernels (backend="torch": the same math, fast);
`test_kernels_interpreted_on_newly_covered_families` runs the Triton kernels under the interpreter
for the families whose kernels are not covered by tests/engine/test_patching.py.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, build_tiny_model
from test_registry import _step

from cpt_studio.engine.speed.registry import NAMES, TRANSFORMS, apply_transforms, plan_transforms

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 384
SWITCHES = {t.switch: True for t in TRANSFORMS}
KERNELS = ("rmsnorm", "swiglu_mlp", "rope", "fused_loss")
GENERIC = set(NAMES) - set(KERNELS)   # transforms of any architecture
# The module kinds each kernel transform binds a forward on (by class-name suffix).
KINDS = {"rmsnorm": "RMSNorm", "swiglu_mlp": "MLP", "rope": "Attention"}

MODEL_TYPE = {arch: arch for arch in ARCHS} | {"gemma3": "gemma3_text"}   # tiny_models' arch -> model_type
# What the plan turns on for each family (model_type: transforms); a rule that changes is a change here.
PLAN_ON = {
    "llama": set(NAMES),
    "mistral": set(NAMES),
    "qwen2": set(NAMES),
    "qwen3": set(NAMES),
    "gemma2": GENERIC,   # (1 + weight) norms, GeGLU, its own attention, soft-capped logits
    "gemma3_text": GENERIC | {"fused_loss"},   # no final soft-cap (checked on the config when applied)
    "phi3": GENERIC | {"rmsnorm", "fused_loss"},   # fused qkv_proj / gate_up_proj: no RoPE, no SwiGLU
}


def _cpt_model(arch: str):
    """The tiny model of `arch` as the engine trains it (random LoRA B, so every gradient is real)."""
    from cpt_studio.engine.config import AdapterConfig
    from cpt_studio.engine.model.adapters import attach_adapters

    base = build_tiny_model(arch, vocab_size=VOCAB)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_adapters(base, AdapterConfig(r=4, alpha=8, embed_tokens="full", lm_head="full"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model.train()


def _ids():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def _stock_step(model, ids):
    return _step(model, lambda: model(input_ids=ids, labels=ids, use_cache=False).loss)


def _assert_same(got, ref, label):
    loss, grads = got
    ref_loss, ref_grads = ref
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"{label}: loss")
    assert grads.keys() == ref_grads.keys()
    assert any("lora_A" in n for n in grads) and any("embed_tokens" in n for n in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{label}: {name}")


def _bound(model, suffix: str) -> dict[str, bool]:
    """{class name: whether every module of it has a forward of ours} for the model's *<suffix> modules."""
    found: dict[str, list[bool]] = {}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith(suffix):
            found.setdefault(name, []).append("forward" in module.__dict__)
    assert all(len(set(v)) == 1 for v in found.values()), found   # all or none of a class
    return {name: v[0] for name, v in found.items()}


def _counts(surgery) -> dict[str, int]:
    counts = {a.name: 0 for a in surgery.applied}
    for a in surgery.applied:
        counts[a.name] += a.count
    return counts


def test_the_tiny_families_have_what_sets_them_apart():
    """The tiny models carry the features the transforms must not get wrong."""
    qwen2 = build_tiny_model("qwen2").model.layers[0].self_attn
    assert all(getattr(qwen2, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    assert hasattr(build_tiny_model("qwen3").model.layers[0].self_attn, "q_norm")
    for arch, cap in (("gemma2", 30.0), ("gemma3", None)):
        gemma = build_tiny_model(arch)
        assert gemma.lm_head.weight is gemma.model.embed_tokens.weight   # tied
        assert float(gemma.model.embed_tokens.embed_scale) == pytest.approx(32 ** 0.5)
        assert type(gemma.model.layers[0].mlp.act_fn).__name__ == "GELUTanh"
        assert gemma.config.final_logit_softcapping == cap
        assert gemma.config.layer_types == ["sliding_attention", "full_attention"]
    phi3 = build_tiny_model("phi3").model.layers[0]
    assert hasattr(phi3.self_attn, "qkv_proj") and hasattr(phi3.mlp, "gate_up_proj")


@pytest.mark.parametrize("arch", ARCHS)
def test_the_plan_of_each_family_gives_the_stock_loss_and_gradients(arch):
    model = _cpt_model(arch)
    model_type = model.config.model_type
    assert model_type == MODEL_TYPE[arch]
    ids = _ids()
    stock = _stock_step(model, ids)

    choices = {c.name: c for c in plan_transforms(model_type, SWITCHES)}
    assert {n for n, c in choices.items() if c.on} == PLAN_ON[model_type]
    for c in choices.values():
        assert c.why.startswith("on: " if c.on else "off: "), c
        if not c.on:
            assert f"architecture {model_type!r}" in c.why, c

    surgery = apply_transforms(model, choices.values(), backend="torch")
    try:
        counts = _counts(surgery)
        assert set(counts) == PLAN_ON[model_type]
        layers = model.config.num_hidden_layers
        assert counts["lora_forwards"] == len([n for n in model.state_dict() if "lora_A" in n])
        assert counts["offload_checkpoints"] == layers and counts["stream_in_compute_dtype"] == 1
        assert counts["free_frozen_embeddings"] == (1 if model.config.tie_word_embeddings else 2)
        assert counts["sparse_embedding_grad"] == (0 if arch.startswith("gemma") else 1)
        assert surgery.fused_loss == ("fused_loss" in counts)
        for name, suffix in KINDS.items():   # on: every module of the kind; off: none
            bound = _bound(model, suffix)
            assert bound and all(v == (name in counts) for v in bound.values()), (name, bound)
            kind = [m for m in model.modules() if type(m).__name__.endswith(suffix)]
            assert counts.get(name, 0) == (len(kind) if name in counts else 0)
        got = _step(model, lambda: surgery.loss(model, ids, ids))
    finally:
        surgery.revert()
    _assert_same(got, stock, arch)
    assert not any("forward" in m.__dict__ for m in model.modules())
    _assert_same(_stock_step(model, ids), stock, f"{arch} reverted")


# Each kernel that the plan leaves off for a family: (tiny model arch, transform).
FORCED = [(arch, name) for arch in ARCHS for name in KERNELS if name not in PLAN_ON[MODEL_TYPE[arch]]]


@pytest.mark.parametrize("arch,name", FORCED)
def test_a_kernel_forced_onto_a_family_it_does_not_support_stays_stock_with_a_note(arch, name):
    model = _cpt_model(arch)
    ids = _ids()
    stock = _stock_step(model, ids)
    [why] = [c.why for c in plan_transforms(MODEL_TYPE[arch], SWITCHES) if c.name == name]
    surgery = apply_transforms(model, [name], backend="torch")   # past the plan
    try:
        assert _counts(surgery) == {name: 0} and not surgery.fused_loss
        assert not any("forward" in m.__dict__ for m in model.modules())
        [note] = surgery.notes
        assert why.removeprefix("off: ") in note   # the plan's reason, in the surgery's notes
        got = _step(model, lambda: surgery.loss(model, ids, ids))
    finally:
        surgery.revert()
    _assert_same(got, stock, f"{arch} {name}")


def test_a_gemma_config_with_a_final_soft_cap_keeps_the_stock_loss():
    """Gemma-3's plan has the fused loss (its checkpoints do not soft-cap the logits); a config that
    does soft-cap them keeps transformers' loss, with the reason."""
    from cpt_studio.engine.config import AdapterConfig
    from cpt_studio.engine.model.adapters import attach_adapters

    base = build_tiny_model("gemma3", vocab_size=VOCAB, final_logit_softcapping=2.0)
    with torch.no_grad():   # logits of a few units, which the cap bends (random ones are ~0.1)
        base.get_output_embeddings().weight.mul_(50)
    model = attach_adapters(base, AdapterConfig(r=4, alpha=8))
    ids = _ids()
    stock = _stock_step(model, ids)
    assert {c.name: c.on for c in plan_transforms("gemma3_text", SWITCHES)}["fused_loss"]
    surgery = apply_transforms(model, ["fused_loss"], backend="torch")
    try:
        assert not surgery.fused_loss
        assert surgery.notes == ["fused lm_head + cross-entropy off: Gemma3ForCausalLM soft-caps its "
                                 "logits (final_logit_softcapping=2.0); the fused kernel does not"]
        got = _step(model, lambda: surgery.loss(model, ids, ids))
    finally:
        surgery.revert()
    _assert_same(got, stock, "soft-capped gemma3")


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "phi3"])
def test_kernels_interpreted_on_newly_covered_families(arch, dev):
    """The Triton kernels the plan turns on (under the interpreter on CPU, compiled on CUDA): Qwen3's
    q/k norms over head_dim rows, Gemma-3's fused loss with a tied trained head, Phi-3's norms and
    fused loss. Llama, Qwen2 (and RoPE on Mistral, Qwen3): tests/engine/test_patching.py."""
    pytest.importorskip("triton")   # Linux only (requirements.lock)
    from cpt_studio.kernels.dispatch import TRITON_INTERPRETED

    if (dev == "cpu") != TRITON_INTERPRETED:
        pytest.skip("Triton runs on CPU tensors under the interpreter only, on CUDA ones compiled only")
    model = _cpt_model(arch).to(dev)
    ids = _ids().to(dev)
    stock = _stock_step(model, ids)
    choices = plan_transforms(model.config.model_type, SWITCHES)
    surgery = apply_transforms(model, [c for c in choices if c.on and c.name in KERNELS], backend="triton")
    try:
        assert surgery.impl == "Triton" and surgery.fused_loss
        got = _step(model, lambda: surgery.loss(model, ids, ids))
    finally:
        surgery.revert()
    _assert_same(got, stock, f"{arch} (Triton)")
