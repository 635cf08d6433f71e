"""engine/speed/rope.py and attention_forwards.py: our reviewed attention forwards with kernels.apply_rope.

- Llama, Mistral, Qwen2, Qwen3 (sliding windows on for the last three, attention dropout on): the
  logits and every gradient are transformers' (fp32 tight, bf16 loose), eager and sdpa;
- the attention function is the one transformers' forward dispatches to and gets the same inputs
  (dropout only in training, scaling, sliding_window and the decoder's keywords);
- generation with a KV cache gives the same tokens and scores, each step through our forward;
- the installed forward's fingerprint picks a copy; KNOWN and REVIEWED list the same fingerprints;
- a forward we did not review (a modified copy on the class, a subclass' own forward) keeps
  transformers' forward, with the reason;
- revert leaves the class forward the object it was and the logits bit for bit.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import types
import warnings

import pytest
import torch
import transformers
from tiny_models import build_tiny_model

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cpt_studio.engine.speed import attention_forwards, upstream  # noqa: E402
from cpt_studio.engine.speed.attention_forwards import CACHE, PAST_KEY_VALUES, REVIEWED  # noqa: E402
from cpt_studio.engine.speed.rope import ROPE_OFF, rope_forwards  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
PREFIXES = ("Llama", "Mistral", "Qwen2", "Qwen3")
WINDOW = 6   # shorter than the sequences below: the sliding masks and caches matter
LAYERS = 2


@pytest.fixture(autouse=True)
def warnings_log(monkeypatch, caplog):
    """Each test starts with no reason logged yet; returns the upstream warnings so far."""
    monkeypatch.setattr(upstream, "_warned", set())
    caplog.set_level(logging.WARNING, logger=upstream.log.name)
    return lambda: [r.getMessage() for r in caplog.records if r.name == upstream.log.name]


@pytest.fixture
def rope_calls(monkeypatch):
    """The q shapes kernels.apply_rope was called with (our forwards call it, transformers' do not)."""
    from cpt_studio import kernels

    calls, apply_rope = [], kernels.apply_rope

    def counted(q, *args, **kwargs):
        calls.append(q.shape)
        return apply_rope(q, *args, **kwargs)

    monkeypatch.setattr(kernels, "apply_rope", counted)
    return calls


def _model(arch, attn="sdpa", dtype=torch.float32, **config):
    """A tiny random model; Mistral slides every layer, Qwen2/Qwen3 their second (WINDOW tokens)."""
    window = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    window = {"llama": {}, "mistral": dict(sliding_window=WINDOW)}.get(arch, window)
    return build_tiny_model(arch, vocab_size=100, attn_implementation=attn, **window, **config).to(dtype)


def _ids(batch=2, seq=12):
    return torch.randint(2, 100, (batch, seq), generator=torch.Generator().manual_seed(1))


@contextlib.contextmanager
def _ours(model, backend="torch"):
    """Our forward bound on every attention module while inside."""
    forwards, left = rope_forwards(model, PREFIXES, backend)
    assert left == {} and len(forwards) == LAYERS
    for module, forward in forwards:
        module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        for module, _ in forwards:
            del module.forward


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)   # the same attention dropout masks in both runs
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch,backend,dtype", [
    *[(a, "torch", d) for a in ARCHS for d in (torch.float32, torch.bfloat16)],
    ("qwen3", "auto", torch.float32)])   # the Triton kernel (interpreted on CPU); its bf16 in tests/kernels
def test_logits_and_gradients_are_transformers(arch, backend, attn, dtype, rope_calls):
    model = _model(arch, attn, dtype, attention_dropout=0.25).train()
    ids = _ids()
    ref_logits, ref = _logits_and_grads(model, ids)
    with _ours(model, backend):
        logits, got = _logits_and_grads(model, ids)
    assert len(rope_calls) == LAYERS
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
    assert got.keys() == ref.keys()
    for name in ref:   # as a whole, as tests/kernels compare bf16 gradients
        assert (got[name] - ref[name]).norm() <= tol * ref[name].norm() + 1e-8, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_compiled_kernel_on_cuda_gives_transformers_results(arch, attn, dtype, rope_calls):
    """Logits, gradients and (fp32) greedy tokens with the compiled Triton kernel."""
    model = _model(arch, attn, dtype, attention_dropout=0.25).cuda().train()
    ids = _ids().cuda()
    ref_logits, ref = _logits_and_grads(model, ids)
    with _ours(model, "auto"):
        logits, got = _logits_and_grads(model, ids)
    assert len(rope_calls) == LAYERS
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
    # bf16: one relative norm over all gradients (a single small reduction, e.g. k_norm.weight's,
    # can differ by a few percent when transformers rounds each term and the kernel once)
    flat = [torch.cat([g[n].flatten() for n in ref]) for g in (got, ref)] if tol > 1e-5 else None
    pairs = [flat] if flat else [(got[n], ref[n]) for n in ref]
    for mine, want in pairs:
        assert (mine - want).norm() <= tol * want.norm() + 1e-8
    if dtype == torch.float32:
        model.eval()
        kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
        with torch.no_grad():
            want_tokens = model.generate(ids[:, :8], **kw)
            with _ours(model, "auto"):
                assert torch.equal(model.generate(ids[:, :8], **kw), want_tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_a_kv_cache_gives_the_same_tokens(arch, rope_calls):
    model = _model(arch).eval()
    prompt = _ids(seq=8)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(prompt, **kw)
        with _ours(model):
            got = model.generate(prompt, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    for step, want in zip(got.scores, ref.scores, strict=True):
        torch.testing.assert_close(step, want, rtol=1e-5, atol=1e-5)
    # the prompt, then one token a step from the cache (past the sliding window)
    assert [shape[2] for shape in rope_calls] == [8] * LAYERS + [1] * (4 * LAYERS)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_attention_function_gets_what_transformers_passes_it(arch, attn, training, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = _model(arch, attn, attention_dropout=0.25).train(training)
    modeling = inspect.getmodule(type(model))
    seen = []
    # eager: the modeling module's eager_attention_forward, the default of the lookup; else the registry's
    function = modeling.eager_attention_forward if attn == "eager" else ALL_ATTENTION_FUNCTIONS[attn]

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, query, key, value, attention_mask, kwargs))
        return function(module, query, key, value, attention_mask, **kwargs)

    if attn == "eager":
        monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    else:
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, attn, recording)
    ids = _ids()
    runs = []
    for ours in (False, True):
        seen.clear()
        with torch.no_grad(), (_ours(model) if ours else contextlib.nullcontext()):
            torch.manual_seed(0)
            model(input_ids=ids)
        runs.append(list(seen))
    theirs, mine = runs
    assert len(mine) == len(theirs) == LAYERS
    for (layer, *tensors, kwargs), (want_layer, *want_tensors, want_kwargs) in zip(mine, theirs):
        assert layer == want_layer and kwargs.keys() == want_kwargs.keys()
        for got, want in zip([*tensors, *kwargs.values()], [*want_tensors, *want_kwargs.values()]):
            assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want
    assert [kw["dropout"] for *_, kw in mine] == [0.25 if training else 0.0] * LAYERS
    windows = [kw.get("sliding_window", "absent") for *_, kw in mine]
    assert windows == {"llama": ["absent"] * 2, "mistral": [WINDOW] * 2}.get(arch, [None, WINDOW])


@pytest.mark.parametrize("arch", ARCHS)
def test_a_direct_call_with_past_key_values_fills_the_cache_as_transformers_does(arch):
    """Called as the layer did before 5.24 (past_key_values=): 5.24+ maps it to `cache` in both."""
    from transformers import DynamicCache

    model = _model(arch, "eager").eval()
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))
    rotary = model.model.rotary_emb(x, torch.arange(5)[None])
    results = []
    for ours in (False, True):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), warnings.catch_warnings(), (_ours(model) if ours else contextlib.nullcontext()):
            warnings.simplefilter("ignore", FutureWarning)
            out, _ = attention(x, position_embeddings=rotary, attention_mask=None, past_key_values=cache)
        results.append((out, cache.layers[0].keys, cache.layers[0].values))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert results[1][1].shape[2] == 5


class _KeywordFillingCache:
    """As continuous batching's PagedAttentionCache (5.24+): update() fills the attention keywords."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        for given in (*args, *kwargs.values()):
            if isinstance(given, dict):
                given["filled_by_cache"] = layer_idx
        return key_states, value_states


@pytest.mark.parametrize("arch", ARCHS)
def test_the_cache_gets_the_attention_keywords_as_in_transformers(arch, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa, seen = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def recording(module, *args, **kwargs):
        seen.append(kwargs)
        return sdpa(module, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recording)
    model = _model(arch).eval()
    attention = model.model.layers[1].self_attn
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))
    rotary = model.model.rotary_emb(x, torch.arange(5)[None])
    for ours in (False, True):
        with torch.no_grad(), (_ours(model) if ours else contextlib.nullcontext()):
            attention(x, rotary, None, _KeywordFillingCache(), marker="kept")   # the cache positionally
    theirs, mine = seen
    assert mine == theirs and mine["marker"] == "kept"
    release = REVIEWED[type(attention).__name__][upstream.fingerprint(type(attention).forward)]
    assert ("filled_by_cache" in mine) == (release == CACHE)


def _attention_class(class_name):
    model_type = class_name.removesuffix("Attention").lower()
    module = __import__(f"transformers.models.{model_type}.modeling_{model_type}", fromlist=["_"])
    return getattr(module, class_name)


@pytest.mark.parametrize("class_name", [f"{p}Attention" for p in PREFIXES])
def test_the_installed_forward_picks_the_copy_for_its_release(class_name):
    cls = _attention_class(class_name)
    assert set(REVIEWED[class_name]) == set(upstream.KNOWN[f"{class_name}.forward"].known)
    release = REVIEWED[class_name][upstream.fingerprint(cls.forward)]
    parameters = inspect.signature(inspect.unwrap(cls.forward)).parameters
    assert release == (CACHE if "cache" in parameters else PAST_KEY_VALUES)
    assert ("past_key_values" in parameters) == (release == PAST_KEY_VALUES)


def test_a_forward_we_did_not_review_stays_transformers_with_the_reason(monkeypatch, warnings_log):
    from transformers.models.llama.modeling_llama import LlamaAttention

    original = LlamaAttention.forward

    def forward(self, hidden_states, *args, **kwargs):   # transformers' forward on twice the input
        return original(self, 2 * hidden_states, *args, **kwargs)

    monkeypatch.setattr(LlamaAttention, "forward", forward)
    model = _model("llama").eval()
    ids = _ids()
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    reason = (f"RoPE kernel off: transformers {transformers.__version__} changed {forward.__qualname__} "
              f"(fingerprint {upstream.fingerprint(forward)})")
    assert rope_forwards(model, PREFIXES, "torch") == ([], {reason: LAYERS})
    assert reason.startswith(ROPE_OFF) and warnings_log() == [reason]

    from cpt_studio.engine.speed.registry import apply_transforms

    surgery = apply_transforms(model, ["rope"], backend="torch")
    try:
        assert surgery.summary() == [reason]
        assert not any("forward" in layer.self_attn.__dict__ for layer in model.model.layers)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, stock)
    finally:
        surgery.revert()


def test_a_subclass_with_its_own_forward_keeps_it(rope_calls):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    class Qwen3LoggedAttention(Qwen3Attention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = _model("qwen3").eval()
    custom = model.model.layers[1].self_attn
    custom.__class__ = Qwen3LoggedAttention
    forwards, left = rope_forwards(model, PREFIXES, "torch")
    assert [module for module, _ in forwards] == [model.model.layers[0].self_attn]
    [(reason, n)] = left.items()
    assert n == 1 and reason.endswith("Qwen3LoggedAttention.forward has no reviewed copy with our RoPE "
                                      "kernel")
    assert not reason.startswith(ROPE_OFF)


def test_revert_restores_the_class_forward_bit_for_bit():
    from cpt_studio.engine.speed.registry import apply_transforms

    model = _model("qwen3").eval()
    cls = type(model.model.layers[0].self_attn)
    forward, fp = cls.__dict__["forward"], upstream.fingerprint(cls.forward)
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    surgery = apply_transforms(model, ["rope"], backend="torch")
    assert surgery.counts == {"RoPE (PyTorch)": LAYERS}
    assert all("forward" in layer.self_attn.__dict__ for layer in model.model.layers)
    assert cls.__dict__["forward"] is forward
    surgery.revert()
    assert not any("forward" in layer.self_attn.__dict__ for layer in model.model.layers)
    assert cls.__dict__["forward"] is forward and upstream.fingerprint(cls.forward) == fp
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("q_dtype,cos_dtype", [
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)])
def test_rotate_qk_gives_transformers_dtypes_under_bf16_autocast(q_dtype, cos_dtype):
    """transformers' q * cos promotes: bf16 q with fp32 cos/sin (an fp32 stream) gives fp32 q, k."""
    from transformers.models.llama import modeling_llama

    theirs = modeling_llama.apply_rotary_pos_emb   # a kernels Func module on transformers >= 5.25
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 16, generator=g).to(q_dtype).transpose(1, 2)  # [B, H, S, D] views
    k = torch.randn(2, 5, 2, 16, generator=g).to(q_dtype).transpose(1, 2)
    angles = torch.randn(2, 5, 8, generator=g).repeat(1, 1, 2)
    cos, sin = angles.cos().to(cos_dtype), angles.sin().to(cos_dtype)
    dq, dk = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
    results = []
    for fn in (theirs, lambda *a: attention_forwards.rotate_qk(*a, backend="auto")):
        q_in, k_in = q.detach().requires_grad_(), k.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q_out, k_out = fn(q_in, k_in, cos, sin)
        ((q_out.float() * dq).sum() + (k_out.float() * dk).sum()).backward()
        results.append((q_out, k_out, q_in.grad, k_in.grad))
    for want, got in zip(*results):
        assert got.dtype == want.dtype and got.shape == want.shape
        # transformers rounds each bf16 op (and each bf16 gradient term), the kernel once
        tol = dict(rtol=1e-5, atol=1e-5) if got.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got, want, **tol)
