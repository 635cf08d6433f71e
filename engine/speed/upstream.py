"""Is the library code a patch replaces still the code the patch was written for?

    reason = check("apply_rotary_pos_emb", fn)   # None: a version we know; else one line, e.g.
    # "RoPE kernel off: transformers 5.26.0 changed apply_rotary_pos_emb (fingerprint 1a2b3c4d5e6f)"

engine/speed/patching.py, fused_loss.py, rope.py, lora_forward.py and offload_checkpoint.py replace functions of
transformers, peft and bitsandbytes with code that computes the same thing another way. "The same
thing" holds for the versions they were written for; a release can change what a function computes
(a Gemma-style `1 + weight` norm, a logit soft-cap, another term in peft's LoRA forward) with no
name we look up changing. So each call site fingerprints the function it replaces and patches only
when the fingerprint is in KNOWN; otherwise that module stays on the library's own code (correct,
slower), the reason goes to the log once (logging.warning) and into the kernel summary.

A fingerprint is a short sha256 of the function's (or class's) syntax tree without its docstrings
(and other bare string statements), type annotations, decorators and its own name, serialized the
same way on every Python version: a reworded docstring, a type hint, a comment or a reformatted
line keep it; any changed expression, call or constant changes it. Decorators made with
functools.wraps are followed to the function they wrap (`__wrapped__`); a decorator without it
leaves a wrapper whose fingerprint is unknown, so the patch stays off. The source is read from the
installed .py files (inspect.getsource): where it cannot be read, the patch stays off too. The
table's fingerprints are the same on Python 3.11 and 3.12 (transformers 5.17 checked on the GPU
image's 3.12).

A new library version: tests/engine/test_upstream.py names each function whose fingerprint is not
in KNOWN. Read that function's diff against a version listed for it; add the new fingerprint with
its version only when it still computes what our replacement assumes (else change the replacement
first). `fingerprint_source(text, qualname)` gives the fingerprint from a source file, for versions
that are not installed.
"""
from __future__ import annotations

import ast
import copy
import hashlib
import inspect
import logging
import textwrap
import types
import weakref
from dataclasses import dataclass
from importlib import metadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Internal:
    """One replaced library function (or class), where it lives and the fingerprints we know."""

    library: str                 # the distribution whose version a reason names
    off: str                     # what stays off when it does not match, e.g. "RoPE kernel"
    where: tuple[str, ...]       # "module:qualname" of each definition (checked by the tests)
    known: dict[str, str]        # fingerprint -> the versions it was seen in


_FAMILIES = (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"))


def _models(qualname: str, more: tuple[tuple[str, str], ...] = ()) -> tuple[str, ...]:
    """`{}RMSNorm.forward` in the modeling module of each Llama-like family and of `more`
    ((folder, class prefix) pairs)."""
    return tuple(f"transformers.models.{m}.modeling_{m}:{qualname.format(c)}" for m, c in _FAMILIES + more)


_PHI3 = (("phi3", "Phi3"),)


# The releases read: transformers 5.17.0 (the GPU benchmarks), 5.18.0, 5.19.0, 5.20.2, 5.21.1, 5.22.2,
# 5.23.0, 5.24.0 (CI), 5.25.0 (last patch of each minor in pyproject's range); peft 0.21.0-0.21.2;
# bitsandbytes 0.50.0-0.50.2. Where a fingerprint changed, the diff was read before adding it.
# Phi3RMSNorm.forward and Phi3ForCausalLM.forward have Llama's fingerprints in each of those releases.
_TF = "5.17.0 5.18.0 5.19.0 5.20.2 5.21.1 5.22.2 5.23.0 5.24.0 5.25.0"
_PEFT = "0.21.0 0.21.1 0.21.2"
_TF_PKV = "5.17.0 5.18.0 5.19.0 5.20.2 5.21.1 5.22.2 5.23.0 (past_key_values.update(k, v, layer_idx))"
_TF_CACHE = "5.24.0 5.25.0 (cache.update(k, v, layer_idx, kwargs=kwargs))"

KNOWN: dict[str, Internal] = {
    # engine/speed/patching.py: kernels.rmsnorm computes weight * (x / rms(x)) in x's dtype
    "RMSNorm.forward": Internal("transformers", "RMSNorm kernel", _models("{}RMSNorm.forward", _PHI3), {
        "51d7ea77e576": _TF}),
    # engine/speed/patching.py: down(swiglu(gate(x), up(x))), silu on the gate
    "MLP.forward": Internal("transformers", "SwiGLU kernel", _models("{}MLP.forward"), {
        "10010f304d2f": _TF}),
    "SiLUActivation.forward": Internal("transformers", "SwiGLU kernel", (
        "transformers.activations:SiLUActivation.forward",), {
        "e035859ec920": _TF}),
    # engine/speed/rope.py: kernels.apply_rope = q cos + rotate_half(q) sin (halves, not pairs)
    "apply_rotary_pos_emb": Internal("transformers", "RoPE kernel", _models("apply_rotary_pos_emb"), {
        "2c9eb8a47e50": _TF}),
    "rotate_half": Internal("transformers", "RoPE kernel", _models("rotate_half"), {
        "bc7d83913876": _TF}),
    # engine/speed/attention_forwards.py: reviewed copies of these forwards with kernels.apply_rope;
    # the fingerprint picks the copy (its REVIEWED table). 5.24 renamed past_key_values to cache
    # (the old name kept by deprecate_kwarg) and passes kwargs to cache.update; nothing else changed.
    "LlamaAttention.forward": Internal("transformers", "RoPE kernel", (
        "transformers.models.llama.modeling_llama:LlamaAttention.forward",), {
        "f4518d89ab9c": _TF_PKV, "84fe45a8b6e9": _TF_CACHE}),
    "MistralAttention.forward": Internal("transformers", "RoPE kernel", (
        "transformers.models.mistral.modeling_mistral:MistralAttention.forward",), {
        "cbce7b476a93": _TF_PKV, "547f1d418967": _TF_CACHE}),
    "Qwen2Attention.forward": Internal("transformers", "RoPE kernel", (
        "transformers.models.qwen2.modeling_qwen2:Qwen2Attention.forward",), {
        "cd1cad25879d": _TF_PKV, "ee2ddfb065ff": _TF_CACHE}),
    "Qwen3Attention.forward": Internal("transformers", "RoPE kernel", (
        "transformers.models.qwen3.modeling_qwen3:Qwen3Attention.forward",), {
        "7c3e2e6dc4cb": _TF_PKV, "989ae25f4805": _TF_CACHE}),
    # engine/speed/patching.py fused loss: lm_head(hidden) with no scale or soft-cap, then the mean
    # cross-entropy of the shifted labels, -100 ignored
    "ForCausalLM.forward": Internal("transformers", "fused lm_head + cross-entropy",
                                    _models("{}ForCausalLM.forward", _PHI3), {
        "3445d67423f6": "5.17.0 5.18.0 5.19.0 5.20.2",
        "0bf8af3d4c4b": "5.21.1 5.22.2 5.23.0 (lm_head slice through slice_logits_to_keep)",
        "d8f448fd51a2": "5.24.0 5.25.0 (past_key_values renamed cache)"}),
    # Gemma's: the same, then logits = cap * tanh(logits / cap) when config.final_logit_softcapping
    # is set; the fused loss runs only where it is None (engine/speed/fused_loss.loss_code_changed).
    # Each version changed as Llama's did, in the same release.
    "SoftCappedForCausalLM.forward": Internal("transformers", "fused lm_head + cross-entropy", (
        "transformers.models.gemma2.modeling_gemma2:Gemma2ForCausalLM.forward",
        "transformers.models.gemma3.modeling_gemma3:Gemma3ForCausalLM.forward"), {
        "b5232ef1cba3": "5.17.0 5.18.0 5.19.0 5.20.2",
        "99d85ff50849": "5.21.1 5.22.2 5.23.0 (lm_head slice through slice_logits_to_keep)",
        "313070781adf": "5.24.0 5.25.0 (past_key_values renamed cache)"}),
    "ForCausalLMLoss": Internal("transformers", "fused lm_head + cross-entropy", (
        "transformers.loss.loss_utils:ForCausalLMLoss",), {
        "fa889f711e76": _TF}),
    "fixed_cross_entropy": Internal("transformers", "fused lm_head + cross-entropy", (
        "transformers.loss.loss_utils:fixed_cross_entropy",), {
        "8f167f2d493a": _TF}),
    # the fused loss calls the causal LM's body itself, past peft's model wrappers
    "PeftModel.forward": Internal("peft", "fused lm_head + cross-entropy", (
        "peft.peft_model:PeftModel.forward", "peft.peft_model:PeftModelForCausalLM.forward"), {
        "82d058130911": _PEFT + " (PeftModel)",
        "196a199cfdd4": _PEFT + " (PeftModelForCausalLM)"}),
    "BaseTuner.forward": Internal("peft", "fused lm_head + cross-entropy", (
        "peft.tuners.tuners_utils:BaseTuner.forward",), {
        "ca9b3387f5da": _PEFT}),
    # engine/speed/patching.py resolve_lm_head: which module a modules_to_save lm_head runs
    "AuxiliaryTrainingWrapper.forward": Internal("peft", "fused lm_head + cross-entropy", (
        "peft.utils.other:AuxiliaryTrainingWrapper.forward",), {
        "152b9cce2d19": _PEFT}),
    "ModulesToSaveWrapper._forward_wrapped": Internal("peft", "fused lm_head + cross-entropy", (
        "peft.utils.other:ModulesToSaveWrapper._forward_wrapped",), {
        "302cc56ce8c5": _PEFT}),
    # engine/speed/lora_forward.py: base(x) + scaling * B(A(x)) with x cast to A's dtype (resolve_lm_head
    # reads a LoRA lm_head the same way)
    "lora.Linear.forward": Internal("peft", "lean LoRA forward", (
        "peft.tuners.lora.layer:Linear.forward",), {
        "93605d041744": _PEFT}),
    "BaseTunerLayer._cast_input_dtype": Internal("peft", "lean LoRA forward", (
        "peft.tuners.tuners_utils:BaseTunerLayer._cast_input_dtype",), {
        "f28628e2feae": _PEFT}),
    "lora.bnb.Linear4bit.forward": Internal("peft", "fused 4-bit LoRA forward", (
        "peft.tuners.lora.bnb:Linear4bit.forward",), {
        "39a6dff4fb0d": _PEFT}),
    # engine/speed/lora_forward.py LoRA4bitLinearFunction: bitsandbytes' 4-bit forward (compute dtype,
    # bias cast, dequantize + GEMM) done by hand
    "bnb.Linear4bit.forward": Internal("bitsandbytes", "fused 4-bit LoRA forward", (
        "bitsandbytes.nn.modules:Linear4bit.forward",), {
        "6dd4c249a10b": "0.50.0 0.50.1 0.50.2"}),
    # engine/speed/offload_checkpoint.py: each layer calls _gradient_checkpointing_func(fn, *args)
    # with the hidden state first, and fn's keyword arguments bound in a functools.partial
    "GradientCheckpointingLayer": Internal("transformers", "offloaded checkpointing", (
        "transformers.modeling_layers:GradientCheckpointingLayer",), {
        "0e6ef920995c": "5.17.0 5.18.0 5.19.0 5.20.2 5.21.1 5.22.2 (checkpoints __call__)",
        "e19d59e32914": "5.23.0 (checkpoints the subclass' forward, from __init_subclass__)",
        "dc227a28e8c1": "5.24.0 5.25.0 (not without grad; cache=None)"}),
}


def check(key: str, obj, off: str | None = None) -> str | None:
    """None when `obj`'s fingerprint is one KNOWN[key] lists; else the reason, logged once.

    `off` names what stays off (default: the table's); the reason names the library, its installed
    version, the function and its fingerprint.
    """
    internal = KNOWN[key]
    target = _target(obj)
    fp = fingerprint(target)
    if fp in internal.known:
        return None
    detail = f"fingerprint {fp}" if fp else "its source cannot be read"
    return warn_once(f"{off or internal.off} off: {internal.library} {version(internal.library)} "
                     f"changed {getattr(target, '__qualname__', repr(target))} ({detail})")


def check_all(pairs, off: str | None = None) -> str | None:
    """check() for each (key, obj); the first reason, or None. Every mismatch is logged."""
    reasons = [check(key, obj, off) for key, obj in pairs]
    return next((r for r in reasons if r), None)


_warned: set[str] = set()


def warn_once(reason: str) -> str:
    """Logs `reason` as a warning the first time it is seen in this process; returns it."""
    if reason not in _warned:
        _warned.add(reason)
        log.warning(reason)
    return reason


def version(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def unwrap_hub_func(obj):
    """The function a `kernels` Func module holds, else `obj`.

    transformers' `use_kernel_forward_from_hub("rotary_pos_emb")` on apply_rotary_pos_emb, with the
    `kernels` package installed (0.19 here), turns the function into an instance of a Func
    nn.Module whose class forward calls the original function from its closure (kernels'
    _internals/layer/layer.py `_create_func_module`), unless the model was kernelized.

    Raises:
        ValueError: a kernels layer (it has `kernel_layer_name`) whose forward holds no function
            named `func` in its closure.
    """
    if isinstance(obj, types.FunctionType) or not hasattr(type(obj), "kernel_layer_name"):
        return obj
    forward = getattr(type(obj), "forward", None)
    code = getattr(forward, "__code__", None)
    cells = dict(zip(code.co_freevars, forward.__closure__ or ())) if code is not None else {}
    try:
        func = cells["func"].cell_contents
    except (KeyError, ValueError):
        func = None
    if not isinstance(func, types.FunctionType):
        raise ValueError(f"the kernels {version('kernels')} layer {type(obj).__qualname__} holds no "
                         "function in its forward's closure")
    return func


# --- fingerprints -----------------------------------------------------------------------------

_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(obj) -> str | None:
    """12 hex digits of sha256 over obj's normalized syntax tree (see the module docstring), or None
    when its source cannot be read. A bound method counts as its function; functools.wraps
    decorators are followed to the innermost function."""
    target = _target(obj)
    try:
        return _cache[target]
    except (KeyError, TypeError):
        pass
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(target)))
        node = tree.body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        fp = None
    else:
        fp = _digest(node) if isinstance(node, _DEFS) else None
    try:
        _cache[target] = fp
    except TypeError:   # not weak-referenceable: not cached
        pass
    return fp


def fingerprint_source(source: str, qualname: str) -> str:
    """The fingerprint of `qualname` ("Class.method", "function") defined in module source text.

    Raises:
        KeyError: no such definition (one inside `if`/`try` blocks is found; the last one wins).
    """
    body, node = ast.parse(source).body, None
    for name in qualname.split("."):
        node = _find(body, name)
        if node is None:
            raise KeyError(f"{qualname} is not defined in this source")
        body = node.body
    return _digest(node)


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_SKIPPED_FIELDS = {"type_comment", "type_params", "kind"}   # absent/empty/no meaning across Pythons


def _target(obj):
    obj = getattr(obj, "__func__", obj)   # a bound method
    return inspect.unwrap(obj) if callable(obj) and not isinstance(obj, type) else obj


def _find(body: list, name: str):
    found = None
    for stmt in body:
        if isinstance(stmt, _DEFS) and stmt.name == name:
            found = stmt
        elif isinstance(stmt, (ast.If, ast.Try, ast.With)):
            blocks = [stmt.body, getattr(stmt, "orelse", []), getattr(stmt, "finalbody", [])]
            blocks += [h.body for h in getattr(stmt, "handlers", [])]
            for block in blocks:
                found = _find(block, name) or found
    return found


def _digest(node: ast.AST) -> str:
    node = copy.deepcopy(node)
    node.name, node.decorator_list = "", []   # decorators: followed through __wrapped__ instead
    node = _Normalize().visit(node)
    return hashlib.sha256(_serialize(node).encode()).hexdigest()[:12]


class _Normalize(ast.NodeTransformer):
    """Drops docstrings and other bare strings, annotations, and value-less annotated names."""

    def generic_visit(self, node):
        super().generic_visit(node)
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                kept = [s for s in block if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                 and isinstance(s.value.value, str))]
                setattr(node, name, kept or [ast.Pass()])
        return node

    def visit_arg(self, node):
        node.annotation = None
        return node

    def visit_FunctionDef(self, node):
        node.returns = None
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node):
        if node.value is None:
            return None
        return self.visit(ast.Assign(targets=[node.target], value=node.value))


def _serialize(node) -> str:
    """A text form of the tree that is the same on every Python version: fields in their order,
    None and empty lists (fields a version added or left empty) and _SKIPPED_FIELDS left out."""
    if isinstance(node, ast.AST):
        fields = [f"{name}={_serialize(value)}" for name in node._fields if name not in _SKIPPED_FIELDS
                  for value in [getattr(node, name, None)] if value is not None and value != []]
        return f"{type(node).__name__}({' '.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_serialize(v) for v in node) + "]"
    return repr(node)
