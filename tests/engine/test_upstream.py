"""engine/speed/upstream.py: fingerprints of the library code our patches replace, and each call site's
fallback when that code is not a version we know.

- the installed transformers / peft / bitsandbytes functions are all in KNOWN;
- a fingerprint ignores docstrings, comments, annotations, formatting, decorators and the name,
  not a changed expression; functools.wraps chains and kernels' Func modules are unwrapped;
- per call site, a semantically different upstream function (monkeypatched on its class or module)
  leaves that module on the stock path: the stock (modified) forward's outputs, exactly one warning
  naming the function, the same line in patch.summary();
- a model with such a function still trains with the patch applied, as it does without it.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_tiny_model

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers.models.llama.modeling_llama import rotate_half  # noqa: E402

from cpt_studio.engine.speed import upstream  # noqa: E402
from cpt_studio.engine.speed.registry import apply_kernels, apply_transforms  # noqa: E402
from test_patching import _batch, _lora_layers, _lora_only_patch, _peft_model, _train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def warnings_log(monkeypatch, caplog):
    """Each test starts with no reason logged yet; returns the upstream warnings so far."""
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    monkeypatch.setattr(upstream, "_warned", set())
    caplog.set_level(logging.WARNING, logger=upstream.log.name)
    return lambda: [r.getMessage() for r in caplog.records if r.name == upstream.log.name]


def _one_warning(warnings_log, *names: str) -> str:
    [line] = warnings_log()
    assert all(name in line for name in names), line
    return line


# --- fingerprints ----------------------------------------------------------------------------------

def _resolve(where: str):
    module, qualname = where.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return upstream.unwrap_hub_func(obj)


def test_the_installed_versions_are_all_known():
    unknown = []
    for key, internal in upstream.KNOWN.items():
        for where in internal.where:
            try:
                fp = upstream.fingerprint(_resolve(where))
            except ModuleNotFoundError as exc:
                if exc.name == "bitsandbytes":   # not a dependency on macOS: no 4-bit path there
                    continue
                raise
            if fp not in internal.known:
                version = upstream.version(internal.library)
                unknown.append(
                    f"{where} ({internal.library} {version}) has fingerprint {fp}, not in "
                    f"engine/speed/upstream.py KNOWN[{key!r}] ({internal.known}). Read its diff against a "
                    f"version listed there; if it still computes what the {internal.off} assumes, "
                    f"add {fp!r}: {version!r}, else change the {internal.off} first.")
    assert not unknown, "\n".join(unknown)


def test_each_transformers_entry_was_read_in_every_release_the_table_covers():
    """A key added later (the attention forwards) lists a fingerprint for each release in _TF."""
    releases = set(upstream._TF.split())
    for key, internal in upstream.KNOWN.items():
        if internal.library == "transformers":
            read = {word for versions in internal.known.values() for word in versions.split()
                    if word[:1].isdigit()}
            assert read == releases, (key, sorted(releases - read), sorted(read - releases))


BASE = '''
def forward(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))
'''

COSMETIC = '''
@some_decorator("RMSNorm")
def renamed(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """A docstring."""
    # a comment
    variance: torch.Tensor = hidden_states.pow(2).mean(
        -1, keepdim=True,
    )
    "a bare string"
    return self.weight * (hidden_states
                          * torch.rsqrt(variance + self.variance_epsilon))
'''

SEMANTIC = [
    BASE.replace("self.weight *", "(1.0 + self.weight) *"),     # Gemma's norm
    BASE.replace("keepdim=True", "keepdim=False"),
    BASE.replace("mean(-1", "mean(-2"),
    BASE.replace("torch.rsqrt(variance", "torch.sqrt(variance"),
    BASE.replace("(self, hidden_states)", "(self, hidden_states, eps=1e-6)"),
    BASE.replace("    variance =", "    hidden_states = hidden_states.float()\n    variance ="),
]


def test_fingerprint_ignores_docs_comments_annotations_formatting_decorators_and_name():
    assert upstream.fingerprint_source(COSMETIC, "renamed") == upstream.fingerprint_source(BASE, "forward")


@pytest.mark.parametrize("source", SEMANTIC)
def test_fingerprint_changes_with_any_expression(source):
    assert upstream.fingerprint_source(source, "forward") != upstream.fingerprint_source(BASE, "forward")


def _decorate(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


class _Sample:
    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    @_decorate
    @_decorate
    def decorated(self, hidden_states: torch.Tensor):
        """The same body under two functools.wraps decorators."""
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_a_live_function_is_unwrapped_and_fingerprinted_as_its_source():
    from transformers.models.llama import modeling_llama

    base = upstream.fingerprint_source(BASE, "forward")
    assert upstream.fingerprint(_Sample.forward) == base
    assert upstream.fingerprint(_Sample.decorated) == base            # through __wrapped__
    assert upstream.fingerprint(_Sample().forward) == base            # a bound method
    with open(modeling_llama.__file__) as f:
        source = f.read()
    for qualname in ("LlamaRMSNorm.forward", "LlamaForCausalLM.forward", "rotate_half"):
        assert upstream.fingerprint(_resolve(f"{modeling_llama.__name__}:{qualname}")) == \
            upstream.fingerprint_source(source, qualname), qualname
    assert upstream.fingerprint(lambda x: x) is None                   # no def to read


def test_fingerprint_source_finds_definitions_in_if_blocks_and_takes_the_last():
    source = ("if available():\n    class Layer:\n        def forward(self, x):\n            return x\n"
              "class Other:\n    def forward(self, x):\n        return x + 1\n"
              "    def forward(self, x):\n        return x + 2\n")
    assert upstream.fingerprint_source(source, "Layer.forward") == \
        upstream.fingerprint_source("def f(self, x):\n    return x\n", "f")
    assert upstream.fingerprint_source(source, "Other.forward") == \
        upstream.fingerprint_source("def f(self, x):\n    return x + 2\n", "f")
    with pytest.raises(KeyError):
        upstream.fingerprint_source(source, "Layer.backward")


def test_unwrap_hub_func_finds_the_function_in_a_kernels_func_module():
    from transformers.models.llama import modeling_llama

    wrapped = modeling_llama.apply_rotary_pos_emb   # a kernels Func module on transformers >= 5.25
    fn = upstream.unwrap_hub_func(wrapped)
    assert fn.__name__ == "apply_rotary_pos_emb" and fn.__module__ == modeling_llama.__name__
    assert upstream.unwrap_hub_func(fn) is fn

    class Func:   # a kernels layer whose forward no longer holds `func`
        kernel_layer_name = "rotary_pos_emb"

        def forward(self, *args):
            return args

    with pytest.raises(ValueError, match="holds no function"):
        upstream.unwrap_hub_func(Func())


def test_check_names_library_version_function_and_fingerprint_and_logs_once(warnings_log):
    import transformers

    assert upstream.check("rotate_half", _resolve(upstream.KNOWN["rotate_half"].where[0])) is None
    reasons = [upstream.check("rotate_half", _Sample.forward) for _ in range(2)]
    fp = upstream.fingerprint(_Sample.forward)
    assert reasons == [f"RoPE kernel off: transformers {transformers.__version__} changed "
                       f"_Sample.forward (fingerprint {fp})"] * 2
    assert warnings_log() == reasons[:1]


# --- call sites: a changed upstream function leaves its modules stock -------------------------------

class ChangedRMSNorm:
    def forward(self, hidden_states):   # Gemma's: (1 + weight)
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (1.0 + self.weight) * hidden_states.to(input_dtype)


class ChangedMLP:
    def forward(self, x):   # the activation on up_proj, not on gate_proj
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


class ChangedSiLU:
    def forward(self, input):
        return input * torch.sigmoid(1.702 * input)


def _modules(model, suffix):
    return [m for m in model.modules() if type(m).__name__.endswith(suffix)]


@pytest.mark.parametrize("cls_name,changed,suffix,label", [
    ("LlamaRMSNorm", ChangedRMSNorm.forward, "RMSNorm", "RMSNorm kernel"),
    ("LlamaMLP", ChangedMLP.forward, "MLP", "SwiGLU kernel"),
    ("SiLUActivation", ChangedSiLU.forward, "MLP", "SwiGLU kernel")])
def test_changed_norm_or_mlp_forward_stays_stock(monkeypatch, warnings_log, cls_name, changed, suffix,
                                                 label):
    from transformers import activations
    from transformers.models.llama import modeling_llama

    owner = activations if cls_name == "SiLUActivation" else modeling_llama
    monkeypatch.setattr(getattr(owner, cls_name), "forward", changed)
    model = _peft_model("full")
    ids, labels = _batch("cpu")
    modules = _modules(model, suffix)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        stock = [m(x) for m in modules]
        stock_loss = model(input_ids=ids, labels=labels).loss
    patch = apply_kernels(model, enabled=True)
    try:
        assert not any("forward" in m.__dict__ for m in modules)
        assert not any(k.startswith(("RMSNorm (" if suffix == "RMSNorm" else "SwiGLU")) for k in patch.counts)
        with torch.no_grad():
            assert all(torch.equal(m(x), want) for m, want in zip(modules, stock))
            torch.testing.assert_close(patch.loss(model, ids, labels), stock_loss, rtol=1e-5, atol=1e-6)
    finally:
        patch.revert()
    line = _one_warning(warnings_log, f"{label} off: transformers ", changed.__qualname__)
    assert line in patch.summary()


def rotate_half_pairs(x):   # GPT-J's interleaved pairs, not halves
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_pos_emb_backwards(q, k, cos, sin, unsqueeze_dim=1):   # the other direction
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) - (rotate_half(q) * sin), (k * cos) - (rotate_half(k) * sin)


@pytest.mark.parametrize("name,changed", [("rotate_half", rotate_half_pairs),
                                          ("apply_rotary_pos_emb", apply_rotary_pos_emb_backwards)])
def test_changed_rope_functions_stay_stock(monkeypatch, warnings_log, name, changed):
    from transformers.models.llama import modeling_llama

    from test_patching import _rope_ids, _rope_model

    monkeypatch.setattr(modeling_llama, name, changed)
    model = _rope_model("llama", checkpointing=False)
    ids = _rope_ids()
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    patch = apply_transforms(model, ["rope"])
    try:
        assert patch.counts == {} and not any("forward" in m.__dict__ for m in _modules(model, "Attention"))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, stock)
    finally:
        patch.revert()
    line = _one_warning(warnings_log, "RoPE kernel off: transformers ", changed.__qualname__)
    assert patch.summary() == [line]


class SoftcappedForCausalLM:
    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)
        logits = 30.0 * torch.tanh(self.lm_head(out.last_hidden_state) / 30.0)   # Gemma 2's soft-cap
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels,
                                                              vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def label_smoothed_loss(logits, labels, vocab_size, ignore_index=-100, **kwargs):
    labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return F.cross_entropy(logits.float().view(-1, vocab_size), labels.reshape(-1),
                           ignore_index=ignore_index, label_smoothing=0.1)


class ChangedModulesToSave:
    def _forward_wrapped(self, *args, **kwargs):   # the frozen original, whatever is active
        return self.original_module(*args, **kwargs)


@pytest.mark.parametrize("where", ["causal LM forward", "loss function", "modules_to_save"])
def test_changed_causal_lm_loss_code_keeps_the_plain_loss(monkeypatch, warnings_log, where):
    from peft.utils.other import ModulesToSaveWrapper
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    model = _peft_model("full")
    if where == "causal LM forward":
        monkeypatch.setattr(LlamaForCausalLM, "forward", SoftcappedForCausalLM.forward)
        name, library = "SoftcappedForCausalLM.forward", "transformers"
    elif where == "loss function":
        model.get_base_model().loss_function = label_smoothed_loss
        name, library = "label_smoothed_loss", "transformers"
    else:
        monkeypatch.setattr(ModulesToSaveWrapper, "_forward_wrapped", ChangedModulesToSave._forward_wrapped)
        name, library = "ChangedModulesToSave._forward_wrapped", "peft"
    ids, labels = _batch("cpu")
    with torch.no_grad():
        stock = model(input_ids=ids, labels=labels).loss
    patch = apply_kernels(model, enabled=True)
    try:
        assert not patch.fused_loss
        with torch.no_grad():
            assert torch.equal(patch.loss(model, ids, labels), model(input_ids=ids, labels=labels).loss)
            torch.testing.assert_close(patch.loss(model, ids, labels), stock, rtol=1e-5, atol=1e-6)
    finally:
        patch.revert()
    line = _one_warning(warnings_log, f"fused lm_head + cross-entropy off: {library} ", name)
    assert line in patch.summary()
    assert not any(s.startswith("lm_head + cross-entropy") for s in patch.summary())


class ChangedLoraLinear:
    def forward(self, x, *args, **kwargs):   # the LoRA product scaled twice
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.lora_A:
                result = result + self.lora_B[name](self.lora_A[name](x)) * (2 * self.scaling[name])
        return result


def test_changed_peft_lora_forward_stays_peft(monkeypatch, warnings_log):
    from peft.tuners.lora.layer import Linear

    monkeypatch.setattr(Linear, "forward", ChangedLoraLinear.forward)
    model = _peft_model("full")
    ids, labels = _batch("cpu")
    with torch.no_grad():
        stock = model(input_ids=ids, labels=labels).loss
    patch = _lora_only_patch(model)
    try:
        assert patch.counts == {} and not any("forward" in m.__dict__ for m in _lora_layers(model))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, labels=labels).loss, stock)
    finally:
        patch.revert()
    line = _one_warning(warnings_log, "lean LoRA forward off: peft ", "ChangedLoraLinear.forward")
    assert patch.summary() == [line]


class ChangedLinear4bit:
    def forward(self, x):   # computes in x's dtype, whatever compute_dtype says
        import bitsandbytes as bnb
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(self)
        return bnb.matmul_4bit(x, self.weight, bias=self.bias, quant_state=self.weight.quant_state)


class ChangedLoraLinear4bit:
    def forward(self, x, *args, **kwargs):   # no defensive clone, the LoRA product scaled twice
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.lora_A:
                result = result + self.lora_B[name](self.lora_A[name](x)) * (2 * self.scaling[name])
        return result


@pytest.mark.parametrize("library", ["peft", "bitsandbytes"])
def test_changed_4bit_forward_stays_peft(monkeypatch, warnings_log, quant_model_dir, library):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit

    from test_lora_forward import _ids, _load_4bit, _peft_on

    changed = ChangedLoraLinear4bit.forward if library == "peft" else ChangedLinear4bit.forward
    monkeypatch.setattr(Linear4bit if library == "peft" else bnb.nn.Linear4bit, "forward", changed)
    model = _peft_on(_load_4bit(quant_model_dir), checkpointing=False)
    ids = _ids()
    with torch.no_grad():
        stock = model(input_ids=ids, labels=ids).loss
    patch = _lora_only_patch(model)
    try:
        assert patch.counts == {} and not any("forward" in m.__dict__ for m in _lora_layers(model))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, labels=ids).loss, stock)
    finally:
        patch.revert()
    line = _one_warning(warnings_log, f"fused 4-bit LoRA forward off: {library} ", changed.__qualname__)
    assert patch.summary() == [line]


def test_changed_checkpointing_layer_keeps_transformers_checkpointing(monkeypatch, warnings_log):
    """GradientCheckpointingLayer is fingerprinted as a class (its source file): a changed version is
    simulated by a table that does not know the installed one."""
    from cpt_studio.engine.speed.offload_checkpoint import enable_offloaded_checkpointing, offload_stats
    from test_offload_checkpoint import _loss_and_grads, _peft_model as _checkpointed_peft_model

    entry = upstream.KNOWN["GradientCheckpointingLayer"]
    monkeypatch.setitem(upstream.KNOWN, "GradientCheckpointingLayer", dataclasses.replace(entry, known={}))
    model = _checkpointed_peft_model()
    ids, _ = _batch("cpu")
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    before = [m._gradient_checkpointing_func for m in layers]
    ref_loss, ref = _loss_and_grads(model, lambda: model(input_ids=ids, labels=ids).loss)
    assert enable_offloaded_checkpointing(model) == 0 and offload_stats(model) is None
    assert [m._gradient_checkpointing_func for m in layers] == before and len(layers) == 2
    loss, got = _loss_and_grads(model, lambda: model(input_ids=ids, labels=ids).loss)
    assert torch.equal(loss, ref_loss) and all(torch.equal(got[n], ref[n]) for n in ref)
    _one_warning(warnings_log, "offloaded checkpointing off: transformers ", "GradientCheckpointingLayer")


# --- a mismatch still trains ------------------------------------------------------------------------

def test_a_model_with_a_changed_norm_trains_with_the_patch_as_without(monkeypatch, warnings_log):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(LlamaRMSNorm, "forward", ChangedRMSNorm.forward)
    plain = _peft_model("full")
    patched = copy.deepcopy(plain)
    ref = _train(plain, lambda i, lab: plain(input_ids=i, labels=lab).loss, 12, "cpu")
    patch = apply_kernels(patched, enabled=True)
    try:
        assert patch.fused_loss and not any(k.startswith("RMSNorm") for k in patch.counts)
        got = _train(patched, lambda i, lab: patch.loss(patched, i, lab), 12, "cpu")
    finally:
        patch.revert()
    # it learns: each of the 4 batches (repeated in order) has a lower loss 2 epochs later
    assert all(later < first - 0.2 for first, later in zip(ref[:4], ref[8:]))
    assert got == pytest.approx(ref, rel=1e-5)
    _one_warning(warnings_log, "RMSNorm kernel off", "ChangedRMSNorm.forward")
