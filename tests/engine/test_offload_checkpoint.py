"""Offloaded checkpointing gives plain checkpointing's loss and gradients, counts what it offloads.

Every comparison runs the same peft model twice: transformers' non-reentrant checkpointing (the
reference), then the offloaded one. On CPU the host copy is a clone, so the autograd Function,
the autocast and RNG replay and the fallbacks are what is tested here; the gpu test checks the
memory saved on CUDA.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
from tiny_models import build_tiny_model

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cpt_studio.engine.speed.offload_checkpoint import (  # noqa: E402
    disable_offloaded_checkpointing, enable_offloaded_checkpointing, offload_stats)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _checkpointed(model):
    """model with transformers' checkpointing on, as training_setup enables it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # renamed activation_checkpointing_enable in 5.2x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def _peft_model(arch="llama", embed=True, dropout=0.0, base=None):
    """LoRA r4 on every projection (random B: real gradients); trained copies of the embeddings."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                     target_modules=PROJECTIONS,
                     modules_to_save=(["embed_tokens"] if embed else []) + ["lm_head"])
    return _checkpointed(get_peft_model(base or build_tiny_model(arch), cfg))


def _ids(batch=2, seq=16, vocab=320, dev="cpu"):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(dev)


def _loss_and_grads(model, loss_fn, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)   # same dropout masks in both runs
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None}


def _plain_then_offloaded(model, loss_fn):
    ref = _loss_and_grads(model, loss_fn)
    assert enable_offloaded_checkpointing(model) == model.config.num_hidden_layers
    got = _loss_and_grads(model, loss_fn)
    stats = offload_stats(model)
    assert stats.calls == model.config.num_hidden_layers and stats.fallbacks == 0
    return ref, got


def _assert_same(ref, got):
    """Bitwise: the recompute runs the same ops on the same input, in the same order."""
    (ref_loss, ref_grads), (got_loss, got_grads) = ref, got
    assert torch.equal(got_loss, ref_loss)
    assert got_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert torch.equal(got_grads[name], grad), name


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_loss_and_every_trainable_gradient_match_plain_checkpointing(arch):
    model = _peft_model(arch)
    ids = _ids()
    ref, got = _plain_then_offloaded(model, lambda: model(input_ids=ids, labels=ids).loss)
    assert got[1].keys() == _trainable(model) and any("embed_tokens" in n for n in got[1])
    _assert_same(ref, got)


def test_lora_dropout_masks_are_replayed_in_the_recompute():
    model = _peft_model("llama", dropout=0.3)
    ids = _ids()
    ref, got = _plain_then_offloaded(model, lambda: model(input_ids=ids, labels=ids).loss)
    _assert_same(ref, got)


@pytest.mark.parametrize("input_grads", [True, False], ids=["embed-output-needs-grad", "no-input-grad"])
def test_frozen_embeddings_still_train_every_lora_layer(input_grads):
    """Only LoRA (and lm_head) train: with no grad on the layer input, the layers still get grads."""
    model = _peft_model("llama", embed=False)
    base = model.get_base_model()
    if input_grads:   # what transformers' checkpointing enable does for peft models (5.2x)
        base.enable_input_require_grads()
    else:
        with contextlib.suppress(AttributeError):   # older transformers: no hook to remove
            base.disable_input_require_grads()
    ids = _ids()
    assert model.get_input_embeddings()(ids).requires_grad == input_grads
    ref, got = _plain_then_offloaded(model, lambda: model(input_ids=ids, labels=ids).loss)
    lora = [n for n in _trainable(model) if "lora_" in n]
    assert len(lora) == 2 * len(PROJECTIONS) * 2 and not any("embed_tokens" in n for n in got[1])
    for name in lora:
        assert got[1][name].abs().max() > 0, name
    _assert_same(ref, got)


def test_through_the_kernel_patch():
    from cpt_studio.engine.speed.registry import apply_kernels

    model = _peft_model("llama")
    patch = apply_kernels(model, True)
    try:
        ids = _ids()
        ref, got = _plain_then_offloaded(model, lambda: patch.loss(model, ids, ids))
    finally:
        patch.revert()
    _assert_same(ref, got)


def test_bf16_autocast_is_replayed_in_the_recompute():
    """fp32 trained weights under CPU bf16 autocast; the stream kept in bf16 as training runs do."""
    from cpt_studio.engine.speed.embedding_memory import keep_stream_in_compute_dtype

    model = _peft_model("llama")
    keep_stream_in_compute_dtype(model)
    ids = _ids(seq=24)

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss

    ref, got = _plain_then_offloaded(model, loss)
    _assert_same(ref, got)   # a recompute outside autocast (fp32 matmuls) differs
    config = model.config
    assert offload_stats(model).last_forward_bytes == (
        config.num_hidden_layers * 2 * 24 * config.hidden_size * torch.bfloat16.itemsize)


def test_byte_counter_is_layers_times_the_layer_input():
    model = _peft_model("qwen2")
    assert offload_stats(model) is None
    enable_offloaded_checkpointing(model)
    stats = offload_stats(model)
    config = model.config
    for step, (batch, seq) in enumerate([(3, 10), (2, 7)]):
        ids = _ids(batch, seq)
        model(input_ids=ids, labels=ids).loss.backward()
        expected = config.num_hidden_layers * batch * seq * config.hidden_size * 4   # fp32 stream
        assert stats.last_forward_bytes == expected
        assert stats.calls == config.num_hidden_layers * (step + 1)
    assert stats.total_bytes == config.num_hidden_layers * (3 * 10 + 2 * 7) * config.hidden_size * 4
    with torch.no_grad():   # nothing to replay: the layers just run
        model(input_ids=ids)
    assert stats.calls == config.num_hidden_layers * 2


def test_disable_restores_the_previous_functions():
    model = _peft_model("llama")
    layers = model.get_base_model().model.layers
    before = [layer._gradient_checkpointing_func for layer in layers]
    assert enable_offloaded_checkpointing(model) == 2
    assert enable_offloaded_checkpointing(model) == 2   # a second call switches nothing twice
    assert all(layer._gradient_checkpointing_func is not f for layer, f in zip(layers, before))
    assert disable_offloaded_checkpointing(model) == 2
    assert [layer._gradient_checkpointing_func for layer in layers] == before
    assert offload_stats(model) is None and disable_offloaded_checkpointing(model) == 0


def test_nothing_is_switched_without_gradient_checkpointing():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model("llama"), LoraConfig(r=4, target_modules=PROJECTIONS))
    assert enable_offloaded_checkpointing(model) == 0 and offload_stats(model) is None


def _layer_inputs(model, seq=8):
    base = model.get_base_model()
    hidden = torch.randn(2, seq, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(seq).unsqueeze(0)
    cos, sin = base.model.rotary_emb(hidden, positions)
    return base.model.layers[0], hidden, cos, sin, positions


def _layer_grads(layer, model, hidden, cos, sin, positions, keyword):
    model.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_(True)
    cos, sin = cos.clone().requires_grad_(True), sin.clone().requires_grad_(True)
    if keyword:
        out = layer(hidden_states=hidden, position_embeddings=(cos, sin), position_ids=positions)
    else:
        out = layer(hidden, position_embeddings=(cos, sin), position_ids=positions)
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return hidden.grad, cos.grad, sin.grad, grads


@pytest.mark.parametrize("keyword", [False, True], ids=["grad-in-keyword-tensor", "hidden-as-keyword"])
def test_calls_it_cannot_offload_fall_back_with_their_gradients(keyword):
    """A keyword tensor that needs grad (rotary tables here), or hidden passed by keyword."""
    model = _peft_model("llama")
    layer, hidden, cos, sin, positions = _layer_inputs(model)
    ref = _layer_grads(layer, model, hidden, cos, sin, positions, keyword)
    enable_offloaded_checkpointing(model)
    got = _layer_grads(layer, model, hidden, cos, sin, positions, keyword)
    stats = offload_stats(model)
    assert stats.fallbacks == 1 and stats.calls == 0 and stats.last_forward_bytes == 0
    assert all(g is not None for g in ref[:3]) and ref[3]
    for r, g in zip(ref[:3], got[:3]):
        assert torch.equal(r, g)
    assert ref[3].keys() == got[3].keys()
    for name in ref[3]:
        assert torch.equal(ref[3][name], got[3][name]), name


def test_4bit_base_lora_gradients_match(quant_model_dir):
    from cpt_studio.engine.model.adapters import attach_adapters
    from cpt_studio.engine.config import AdapterConfig
    from cpt_studio.engine.model.loading import load_base_model
    from cpt_studio.engine.model.source import ResolvedModel

    base, _ = load_base_model(ResolvedModel("hf_folder", str(quant_model_dir), "", "q"), "4bit", "cpu")
    model = attach_adapters(base, AdapterConfig(r=4, embed_tokens="off", lm_head="off"))
    with torch.no_grad():
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.1)   # non-zero B, so A gets gradients too
    _checkpointed(model)
    ids = _ids(vocab=384)
    ref, got = _plain_then_offloaded(model, lambda: model(input_ids=ids, labels=ids).loss)
    assert got[1] and all(g.abs().max() > 0 for g in got[1].values())
    _assert_same(ref, got)


def test_4bit_kernel_patch_skips_the_down_projection_value_in_the_recompute(quant_model_dir,
                                                                             monkeypatch):
    """The fused 4-bit LoRA function: in the offloaded recompute the MLP's down_proj only saves what
    its backward needs (no dequantize, no GEMM for a value nobody reads); gradients stay bitwise."""
    from cpt_studio.engine.speed import lora_forward
    from cpt_studio.kernels import lora_4bit
    from cpt_studio.engine.model.adapters import attach_adapters
    from cpt_studio.engine.config import AdapterConfig
    from cpt_studio.engine.model.loading import load_base_model
    from cpt_studio.engine.model.source import ResolvedModel
    from cpt_studio.engine.speed.registry import apply_kernels

    base, _ = load_base_model(ResolvedModel("hf_folder", str(quant_model_dir), "", "q"), "4bit", "cpu")
    model = attach_adapters(base, AdapterConfig(r=4, embed_tokens="off", lm_head="off"))
    with torch.no_grad():
        torch.manual_seed(0)
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.1)
    _checkpointed(model)
    patch = apply_kernels(model, True)
    assert patch.counts.get(lora_forward.LEAN_LABELS["4bit"]) == 7 * model.config.num_hidden_layers
    calls = []
    dequantize = lora_4bit.dequantize_4bit_weight
    monkeypatch.setattr(lora_4bit, "dequantize_4bit_weight",
                        lambda *a, **k: calls.append(1) or dequantize(*a, **k))
    ids = _ids(vocab=384)
    try:
        ref = _loss_and_grads(model, lambda: patch.loss(model, ids, ids))
        plain_calls = len(calls)   # the layers tell the patched MLPs when they re-run:
        assert enable_offloaded_checkpointing(model, patch.recompute) == model.config.num_hidden_layers
        calls.clear()
        got = _loss_and_grads(model, lambda: patch.loss(model, ids, ids))
    finally:
        patch.revert()
    layers = model.config.num_hidden_layers
    assert plain_calls == 3 * 7 * layers            # forward, recompute, backward's dx
    assert len(calls) == 3 * 7 * layers - layers    # no down_proj weight in the recompute
    assert got[1] and all(g.abs().max() > 0 for g in got[1].values())
    _assert_same(ref, got)


def test_each_layer_prefetches_the_input_of_the_layer_before_it(monkeypatch):
    """Backward of layer i starts the copy back of layer i-1's input; two forwards in a row (two
    micro-batches) keep separate chains, and gradients stay bitwise."""
    from cpt_studio.engine.speed import offload_checkpoint

    prefetched = []
    original = offload_checkpoint._HostCopy.prefetch
    monkeypatch.setattr(offload_checkpoint._HostCopy, "prefetch",
                        lambda self, device: prefetched.append(id(self)) or original(self, device))
    model = _peft_model("llama")
    layers = model.config.num_hidden_layers
    a, b = _ids(), _ids(seq=12)

    def two_micro_batches():
        return model(input_ids=a, labels=a).loss + model(input_ids=b, labels=b).loss

    ref = _loss_and_grads(model, two_micro_batches)
    assert enable_offloaded_checkpointing(model) == layers
    got = _loss_and_grads(model, two_micro_batches)
    assert offload_stats(model).calls == 2 * layers
    assert len(prefetched) == 2 * (layers - 1) and len(set(prefetched)) == len(prefetched)
    _assert_same(ref, got)


@pytest.mark.gpu
@pytest.mark.parametrize("embed", ["trained", "frozen"])
def test_cuda_memory_after_forward_drops_by_the_offloaded_bytes(embed):
    """Every layer input leaves the GPU. With a frozen embedding, transformers' input-grad hook
    makes the embedding output a leaf that autograd holds anyway: the dummy input makes that hook
    unnecessary, so it is removed here."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    layers, batch, seq, hidden = 6, 2, 1024, 512   # 4 MiB (fp32) per layer input
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=1024,
                                      num_hidden_layers=layers, num_attention_heads=8,
                                      num_key_value_heads=4, max_position_embeddings=seq)
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=PROJECTIONS,
                      modules_to_save=["embed_tokens"] if embed == "trained" else None)
    model = _checkpointed(get_peft_model(transformers.LlamaForCausalLM(config), lora).cuda())
    if embed == "frozen":
        with contextlib.suppress(AttributeError):
            model.get_base_model().disable_input_require_grads()
    ids = _ids(batch, seq, vocab=512, dev="cuda")

    def allocated_after_forward():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")   # a malloc frees the blocks whose side-stream copies ended
        held = torch.cuda.memory_allocated() - start
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return held, loss.detach(), grads

    allocated_after_forward()   # warm-up: cuBLAS workspaces, allocator pools
    plain, ref_loss, ref = allocated_after_forward()
    assert enable_offloaded_checkpointing(model) == layers
    offloaded, loss, got = allocated_after_forward()
    expected = layers * batch * seq * hidden * 4
    assert offload_stats(model).last_forward_bytes == expected
    assert abs((plain - offloaded) - expected) < 0.1 * expected, (plain, offloaded, expected)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    for name in ref:
        assert ref[name].abs().max() > 0, name
        assert torch.allclose(got[name], ref[name], rtol=1e-3, atol=1e-5), name
