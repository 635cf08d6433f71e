"""apply_kernels on a tiny Llama with peft LoRA: same loss and gradients, exact revert, same training.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1 is set below, before the
kernels are imported); where the interpreter is not on, the PyTorch paths run instead. The same
tests run compiled on CUDA when marked gpu (pytest -m gpu on the device).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from tiny_models import build_tiny_model

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cpt_studio.engine.speed.fused_loss import fused_causal_lm_loss, resolve_lm_head  # noqa: E402
from cpt_studio.engine.speed.registry import apply_kernels  # noqa: E402


def transformers_version():
    import transformers

    return transformers.__version__


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build_tiny_model(arch="llama", tied=False):
    return build_tiny_model(arch, tied)


def _peft_model(head="full", arch="llama", dev="cpu"):
    """LoRA r4 on every projection; lm_head a trained copy ("full") or a LoRA ("lora")."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,  # random B: real grads
                     target_modules=targets + (["lm_head"] if head == "lora" else []),
                     modules_to_save=["embed_tokens"] + (["lm_head"] if head == "full" else []))
    return get_peft_model(_build_tiny_model(arch), cfg).to(dev)


def _batch(dev, seed=0, batch=2, seq=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 320, (batch, seq), generator=g)
    return ids.to(dev), ids.to(dev)


def _loss_and_grads(model, loss_fn, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dev", _devices())
@pytest.mark.parametrize("arch,head", [("llama", "full"), ("llama", "lora"), ("qwen2", "full")])
def test_patched_loss_and_every_trainable_gradient_match(dev, arch, head):
    model = _peft_model(head, arch, dev)
    ids, labels = _batch(dev)
    plain = lambda i, lab: model(input_ids=i, labels=lab).loss  # noqa: E731
    ref_loss, ref = _loss_and_grads(model, plain, ids, labels)
    patch = apply_kernels(model, enabled=True)
    try:
        assert patch.fused_loss
        got_loss, got = _loss_and_grads(model, lambda i, lab: patch.loss(model, i, lab), ids, labels)
    finally:
        patch.revert()
    assert torch.allclose(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == ref.keys() and any("lm_head" in n for n in got)
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("tied,embed,head,kind", [
    (True, "lora", "lora", "tied, LoRA"), (True, "full", "full", "trained copy"),
    (False, "off", "lora", "LoRA on frozen weight")])
def test_heads_built_by_engine_adapters(tied, embed, head, kind):
    """The heads attach_adapters makes (TiedLoraHead included) give the plain loss and gradients."""
    from cpt_studio.engine.model.adapters import attach_adapters
    from cpt_studio.engine.config import AdapterConfig

    model = attach_adapters(_build_tiny_model("llama", tied), AdapterConfig(r=4, embed_tokens=embed, lm_head=head))
    for name, p in model.named_parameters():  # peft starts LoRA B (and embedding A) at zero
        if "lora_" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert resolve_lm_head(model.get_base_model()).kind == kind
    ids, labels = _batch("cpu")
    ref_loss, ref = _loss_and_grads(model, lambda i, lab: model(input_ids=i, labels=lab).loss, ids, labels)
    got_loss, got = _loss_and_grads(model, lambda i, lab: fused_causal_lm_loss(model, i, lab), ids, labels)
    assert torch.allclose(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-6), name


def test_revert_restores_the_exact_original_outputs():
    model = _peft_model("full")
    ids, _ = _batch("cpu")
    with torch.no_grad():
        before = model(input_ids=ids).logits
    patch = apply_kernels(model, enabled=True)
    # 2 norms per layer + final norm + 2 MLPs + 2 attentions' RoPE + 7 LoRA Linears per layer
    assert sum(patch.counts.values()) == 2 * 2 + 1 + 2 + 2 + 2 * 7
    with pytest.raises(RuntimeError, match="already applied"):
        apply_kernels(model, enabled=True)
    patch.revert()
    patch.revert()  # idempotent
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_summary_and_disabled_patch():
    model = _peft_model("lora")
    patch = apply_kernels(model, enabled=True)
    text = "\n".join(patch.summary())
    patch.revert()
    assert "RMSNorm" in text and "SwiGLU MLP" in text and _rope_line(2) in text
    assert "RoPE left as transformers'" not in text
    assert "LoRA on frozen weight" in text
    off = apply_kernels(model, enabled=False)
    assert off.summary() == ["kernels off: transformers' own forward and loss"]
    ids, labels = _batch("cpu")
    with torch.no_grad():
        assert torch.equal(off.loss(model, ids, labels), model(input_ids=ids, labels=labels).loss)


def test_fused_loss_follows_disabled_adapters():
    """With adapters disabled, peft's head is the original frozen lm_head, and so is the fused loss."""
    model = _peft_model("full")
    ids, labels = _batch("cpu")
    with model.disable_adapter(), torch.no_grad():
        assert resolve_lm_head(model.get_base_model()).kind == "frozen"
        fused = fused_causal_lm_loss(model, ids, labels)
        assert torch.allclose(fused, model(input_ids=ids, labels=labels).loss, rtol=1e-5)


def _train(model, loss_fn, steps, dev):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(steps):
        ids, labels = _batch(dev, seed=step % 4)
        loss = loss_fn(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dev", _devices())
def test_training_30_steps_with_and_without_kernels_gives_the_same_losses(dev):
    base = _peft_model("full", dev=dev)
    patched_model = copy.deepcopy(base)
    ref = _train(base, lambda i, lab: base(input_ids=i, labels=lab).loss, 30, dev)
    patch = apply_kernels(patched_model, enabled=True)
    got = _train(patched_model, lambda i, lab: patch.loss(patched_model, i, lab), 30, dev)
    patch.revert()
    assert ref[-1] < ref[0] - 0.5  # it learns (4 batches repeated)
    assert got == pytest.approx(ref, rel=1e-3)


# --- the lean LoRA Linear forward (engine/speed/lora_forward.py) ---------------------------------------

def _peft_on(base, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, target_modules=targets)
    return get_peft_model(base, cfg)


def _lora_only_patch(model):
    """Only the LoRA Linears patched (no Triton norms/MLP), to compare against peft's forward alone."""
    from cpt_studio.engine.speed.registry import apply_transforms

    return apply_transforms(model, ["lora_forwards"])


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _plain_loss(model):
    return lambda i, lab: model(input_ids=i, labels=lab).loss


def _compare_lean(model, vocab, rtol, atol, seed_each=False, autocast=False):
    """Loss and every trainable gradient: peft's forward, then the lean one, then reverted."""
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))

    def run():
        if seed_each:
            torch.manual_seed(123)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _loss_and_grads(model, _plain_loss(model), ids, ids)

    ref_loss, ref = run()
    originals = {id(m): type(m).forward for m in _lora_layers(model)}
    patch = _lora_only_patch(model)
    try:
        got_loss, got = run()
    finally:
        patch.revert()
    back_loss, back = run()
    assert torch.allclose(got_loss, ref_loss, rtol=rtol, atol=atol), (got_loss, ref_loss)
    assert got.keys() == ref.keys() and any("lora_A" in n for n in got)
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=rtol, atol=atol), \
            (name, (got[name] - ref[name]).abs().max())
    # revert: peft's own forward again, bit for bit
    assert torch.equal(back_loss, ref_loss) and all(torch.equal(back[n], ref[n]) for n in ref)
    for m in _lora_layers(model):
        assert "forward" not in m.__dict__ and type(m).forward is originals[id(m)]
    return patch


def test_lean_lora_forward_fp32_matches_peft():
    model = _peft_on(_build_tiny_model("llama"))
    model.train()
    ids, _ = _batch("cpu")
    patch = _compare_lean(model, 320, rtol=1e-5, atol=1e-6)
    assert patch.counts == {}  # cleared by revert
    patch = _lora_only_patch(model)
    assert patch.counts == {"LoRA Linear (lean fused add)": 14}
    assert all(type(m.__dict__["forward"]).__name__ == "method" for m in _lora_layers(model))
    with model.disable_adapter(), torch.no_grad():   # adapters off at call time: peft's path
        off = model(input_ids=ids).logits
    patch.revert()
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(off, model(input_ids=ids).logits)


def test_lean_lora_forward_in_apply_kernels_summary_and_revert():
    model = _peft_model("full")
    patch = apply_kernels(model, enabled=True)
    assert "LoRA Linear (lean fused add): 14 modules" in patch.summary()
    patch.revert()
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_lean_lora_forward_bf16_autocast_matches_peft():
    """The path the GPU runs: fp32 LoRA weights under bf16 autocast (CPU autocast here)."""
    model = _peft_on(_build_tiny_model("llama"))
    _compare_lean(model, 320, rtol=3e-2, atol=2e-3, autocast=True)


def test_lean_lora_forward_bf16_base_fp32_lora_without_autocast():
    """A bf16 base with fp32 LoRA weights, no autocast: the LoRA product is added in fp32 (as peft)."""
    model = _peft_on(_build_tiny_model("llama").to(torch.bfloat16))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    _compare_lean(model, 320, rtol=2e-2, atol=1e-3)


def test_lora_dropout_layers_are_left_as_peft():
    model = _peft_on(_build_tiny_model("llama"), dropout=0.1)
    model.train()
    patch = apply_kernels(model, enabled=True)
    try:
        assert not any(k.startswith("LoRA Linear") for k in patch.counts)
        assert any("LoRA layers left as peft's: 14" in n for n in patch.summary())
        assert not any("forward" in m.__dict__ for m in _lora_layers(model))
    finally:
        patch.revert()
    _compare_lean(model, 320, rtol=1e-5, atol=1e-6, seed_each=True)  # same dropout masks: equal


# The 4-bit LoRA layers (the fused 4-bit function): tests/engine/test_lora_forward.py


@pytest.mark.parametrize("head,embed_trained", [("full", True), ("full", False), ("lora", True)])
def test_deferred_head_grad_gives_the_same_loss_and_gradients(head, embed_trained, monkeypatch):
    """training.defer_head_grad: the trained lm_head's gradient is computed after the layers'
    backward (kernels.DeferredWeightGrad) with the same values; a LoRA head or a frozen embedding
    (nothing upstream to trigger it) keeps the usual path."""
    from cpt_studio.kernels.deferred_weight_grad import DeferredWeightGrad

    deferred_runs = []
    compute = DeferredWeightGrad.compute
    monkeypatch.setattr(DeferredWeightGrad, "compute",
                        lambda self: (deferred_runs.append(self.saved is not None), compute(self))[1])
    model = _peft_model(head)
    if not embed_trained:
        for name, param in model.named_parameters():
            if "embed_tokens" in name:
                param.requires_grad_(False)
    ids, labels = _batch("cpu")
    results = []
    for defer in (False, True):
        patch = apply_kernels(model, enabled=True, defer_head_grad=defer)
        try:
            results.append(_loss_and_grads(model, lambda i, lab: patch.loss(model, i, lab), ids, labels))
        finally:
            patch.revert()
    (loss, grads), (loss_d, grads_d) = results
    assert deferred_runs == ([True] if head == "full" and embed_trained else [])
    assert torch.equal(loss, loss_d) and grads.keys() == grads_d.keys()
    assert any("lm_head" in n for n in grads)
    for name in grads:
        assert torch.equal(grads[name], grads_d[name]), name


# --- RoPE: kernels.apply_rope in our copies of transformers' attention forwards ------------------------

ROPE_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def _rope_line(n_modules):
    from cpt_studio.kernels import triton_available

    return f"RoPE ({'Triton' if triton_available() else 'PyTorch'}): {n_modules} modules"


def _rope_model(arch, checkpointing=True):
    """A tiny random causal LM (hidden 64, 4 heads of 16, 2 kv heads), in training mode."""
    import transformers

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    config = getattr(transformers, f"{names}Config")(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, eos_token_id=0, pad_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    model = getattr(transformers, f"{names}ForCausalLM")(config)
    if checkpointing:  # the recompute runs the patched forward again (training_setup's setting)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _rope_ids(seq=12):
    return torch.randint(0, 100, (2, seq), generator=torch.Generator().manual_seed(1))


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _count_rope_launches(monkeypatch):
    """Counts the Triton RoPE forward launches (the recompute's included)."""
    from cpt_studio.kernels import rope

    launches = []
    forward = rope.rope_forward
    monkeypatch.setattr(rope, "rope_forward", lambda *a: (launches.append(1), forward(*a))[1])
    return launches


def _rope_only_patch(model):
    """Only RoPE patched, to compare against transformers' attention alone."""
    from cpt_studio.engine.speed.registry import apply_transforms

    patch = apply_transforms(model, ["rope"])
    assert patch.counts == {f"RoPE ({patch.impl})": model.config.num_hidden_layers}
    return patch


@pytest.mark.parametrize("dev", _devices())
@pytest.mark.parametrize("arch", ROPE_ARCHS)
def test_rope_kernel_in_each_attention_gives_the_same_logits_and_gradients(arch, dev, monkeypatch):
    """fp32, non-reentrant checkpointing: transformers' attention with its RoPE vs with ours."""
    from cpt_studio.kernels.dispatch import TRITON_INTERPRETED

    model = _rope_model(arch).to(dev)
    ids = _rope_ids().to(dev)
    ref_logits, ref = _logits_and_grads(model, ids)
    launches = _count_rope_launches(monkeypatch)
    patch = apply_kernels(model, enabled=True)
    try:
        assert _rope_line(model.config.num_hidden_layers) in patch.summary()
        assert not any(line.startswith("RoPE left") for line in patch.summary())
        logits, got = _logits_and_grads(model, ids)
    finally:
        patch.revert()
    if TRITON_INTERPRETED or dev == "cuda":  # forward + recompute, per layer
        assert len(launches) == 2 * model.config.num_hidden_layers
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_rope_revert_restores_transformers_forward_bit_for_bit():
    import inspect

    from transformers.models.llama import modeling_llama

    model = _rope_model("llama", checkpointing=False).eval()
    ids = _rope_ids()
    attention = [m for m in model.modules() if isinstance(m, modeling_llama.LlamaAttention)]
    original = modeling_llama.apply_rotary_pos_emb
    with torch.no_grad():
        before = model(input_ids=ids).logits
    patch = apply_kernels(model, enabled=True)
    assert all(getattr(m.__dict__.get("forward"), "__func__", None) is not None for m in attention)
    assert modeling_llama.apply_rotary_pos_emb is original  # the modeling module is not touched
    unwrapped = inspect.unwrap(modeling_llama.LlamaAttention.forward)
    assert unwrapped.__globals__["apply_rotary_pos_emb"] is original
    patch.revert()
    assert not any("forward" in m.__dict__ for m in attention)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_rope_keeps_transformers_decorators_on_forward():
    """transformers' deprecate_kwarg on forward (5.24+) still maps past_key_values to cache in ours."""
    import inspect
    import warnings

    from transformers.models.llama import modeling_llama

    if "cache" not in inspect.signature(inspect.unwrap(modeling_llama.LlamaAttention.forward)).parameters:
        pytest.skip("before 5.24 the attention forward takes past_key_values itself")
    model = _rope_model("llama", checkpointing=False)
    patch = apply_kernels(model, enabled=True)
    try:
        attention = model.model.layers[0].self_attn
        x = torch.randn(1, 5, 64)
        rotary = model.model.rotary_emb(x, torch.arange(5)[None])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = attention(x, position_embeddings=rotary, attention_mask=None, past_key_values=None)
    finally:
        patch.revert()
    assert any("past_key_values" in str(w.message) for w in caught)
    with torch.no_grad():
        torch.testing.assert_close(out, attention(x, position_embeddings=rotary, attention_mask=None)[0])


def test_an_attention_subclass_with_its_own_forward_is_left_with_a_note():
    from transformers.models.llama.modeling_llama import LlamaAttention

    class LlamaCustomAttention(LlamaAttention):
        def forward(self, *args, **kwargs):  # not a forward engine/speed/attention_forwards.py reviewed
            return super().forward(*args, **kwargs)

    model = _rope_model("llama", checkpointing=False)
    custom = model.model.layers[1].self_attn
    custom.__class__ = LlamaCustomAttention
    ids = _rope_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    patch = apply_kernels(model, enabled=True)
    try:
        assert "forward" not in custom.__dict__
        assert _rope_line(1) in patch.summary()
        note = next(line for line in patch.summary() if line.startswith("RoPE left"))
        assert note.startswith("RoPE left as transformers': 1 attention modules (")
        assert "LlamaCustomAttention.forward has no reviewed copy" in note
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    finally:
        patch.revert()


def test_an_unknown_rope_function_is_left_with_a_note(monkeypatch):
    """An apply_rotary_pos_emb whose source cannot be read is not a version engine/speed/upstream.py
    knows (its fingerprint fixes the parameters, unsqueeze_dim=1 included)."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", lambda q, k, cos, sin, scale: (q, k))
    model = _rope_model("llama", checkpointing=False)
    patch = apply_kernels(model, enabled=True)
    try:
        assert not any(line.startswith("RoPE (") for line in patch.summary())
        [line] = [line for line in patch.summary() if line.startswith("RoPE")]
        assert line.startswith(f"RoPE kernel off: transformers {transformers_version()} changed ")
        assert line.endswith("<lambda> (its source cannot be read)")
    finally:
        patch.revert()


@pytest.mark.parametrize("bf16_stream", [False, True])
def test_rope_kernel_under_bf16_autocast_and_checkpointing(bf16_stream):
    """The GPU setting on CPU: bf16 autocast, non-reentrant checkpointing, the residual stream fp32
    or cast to bf16 (engine.speed.embedding_memory, training.stream_in_compute_dtype)."""
    from cpt_studio.engine.speed.embedding_memory import keep_stream_in_compute_dtype

    model = _rope_model("llama")
    if bf16_stream:
        keep_stream_in_compute_dtype(model)
    ids = _rope_ids()

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = run()
    patch = _rope_only_patch(model)
    try:
        loss, got = run()
    finally:
        patch.revert()
    # The gradients of the bf16 q and k are rounded per term by transformers, once by the kernel:
    # compared as a whole (relative norm of the difference), as tests/kernels do.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3 if bf16_stream else 1e-6, atol=0)
    for name in ref:
        assert (got[name] - ref[name]).norm() <= 2e-2 * ref[name].norm(), name
