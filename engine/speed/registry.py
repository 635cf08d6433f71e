"""Every change engine/speed makes to a loaded model: one list, one order, one undo.

    choices = plan_transforms("llama", {"kernels": True, ...})   # in the Plan (engine/train/plan.py)
    surgery = apply_transforms(model, choices, backend="auto")
    loss = surgery.loss(model, input_ids, labels)                # fused lm_head + CE where it applies
    surgery.summary()                                            # lines for the Run page and the log
    surgery.revert()                                             # the stock model, bit for bit

TRANSFORMS lists each transform with what it applies to, the plan switch that asks for it and the
library code it stands in for (engine/speed/upstream.py keys). `plan_transforms` decides from the
architecture, the switches and the installed library versions alone (no weights), so the Plan
says before loading which transforms will run and why the others will not. `apply_transforms`
applies the chosen ones in TRANSFORMS' order; each instance is checked again (a LoRA layer with
dropout, a head of another kind) and what does not fit stays on the stock path with a note.

State between transforms is an explicit object, not a thread-local: `surgery.recompute` (set by
the offloaded checkpoints while they re-run a layer for its backward, read by the patched MLP).
"""
from __future__ import annotations

import logging
import types
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from . import coverage, embedding_memory, patching, upstream
from .coverage import Coverage
from .fused_loss import (HeadCodeChanged, UnsupportedHead, causal_lm_of, fused_causal_lm_loss,
                         loss_code_changed, resolve_lm_head)
from .lora_group import LABEL as GROUP_LABEL
from .offload_checkpoint import Recompute, apply_offloaded_checkpointing

log = logging.getLogger(__name__)

KERNELS = "kernels"


@dataclass(frozen=True)
class Transform:
    name: str
    label: str                     # its line in the summary; "{impl}" becomes Triton or PyTorch
    applies_to: str                # the rule, in words
    switch: str                    # the Plan switch that asks for it
    apply: Callable[[nn.Module, "Surgery"], None]
    replaces: tuple[str, ...] = ()   # upstream.KNOWN keys of the code it stands in for
    architectures: Coverage | None = None   # model types it applies to (speed/coverage.py); None: any


def _apply_fused_loss(model: nn.Module, surgery: Surgery) -> None:
    causal_lm = causal_lm_of(model)
    reason = coverage.FUSED_LOSS.reason(coverage.model_type_of(causal_lm))
    if reason:
        surgery.note(f"lm_head + cross-entropy: not fused ({reason})")
        return
    if surgery.noted(loss_code_changed(model, causal_lm)):
        return
    try:
        head = resolve_lm_head(causal_lm)
    except HeadCodeChanged as exc:
        surgery.noted(str(exc))
        return
    except UnsupportedHead as exc:
        surgery.note(f"lm_head + cross-entropy: not fused ({exc})")
        return
    surgery.fused_loss = True
    surgery.note(f"lm_head + cross-entropy: fused and chunked ({head.kind} head)")
    surgery.on_undo(lambda: setattr(surgery, "fused_loss", False))


TRANSFORMS: tuple[Transform, ...] = (
    Transform("stream_in_compute_dtype", "embedding output cast to the autocast dtype",
              "the input embedding of any model (a forward hook)", "stream_in_compute_dtype",
              embedding_memory.apply_stream_cast),
    Transform("free_frozen_embeddings", "frozen embed_tokens/lm_head originals moved to host memory",
              "peft modules_to_save wrappers with their adapter active", "free_frozen_embeddings",
              embedding_memory.apply_free_originals),
    Transform("sparse_embedding_grad", "embed_tokens gradient: rows of the batch's tokens only",
              "an untied, fully trained nn.Embedding copy", "sparse_embedding_grad",
              embedding_memory.apply_sparse_grad),
    Transform("offload_checkpoints", "checkpointed layer inputs in host memory",
              "every decoder layer with gradient checkpointing on", "offload_checkpoints",
              apply_offloaded_checkpointing, ("GradientCheckpointingLayer",)),
    Transform("rmsnorm", "RMSNorm ({impl})", "*RMSNorm modules", KERNELS, patching.apply_rmsnorm,
              ("RMSNorm.forward",), coverage.RMSNORM),
    Transform("swiglu_mlp", "SwiGLU MLP ({impl})", "*MLP modules with a SiLU gate", KERNELS,
              patching.apply_swiglu_mlp, ("MLP.forward", "SiLUActivation.forward"), coverage.SWIGLU),
    Transform("rope", "RoPE ({impl})", "*Attention modules", KERNELS, patching.apply_rope,
              ("apply_rotary_pos_emb", "rotate_half", "LlamaAttention.forward", "MistralAttention.forward",
               "Qwen2Attention.forward", "Qwen3Attention.forward"), coverage.ROPE),
    Transform("lora_forwards", "LoRA Linear", "peft LoRA Linear layers (nn.Linear or bnb 4-bit base) "
              "with one active adapter, no dropout, no DoRA", KERNELS, patching.apply_lora_forwards,
              ("lora.Linear.forward", "BaseTunerLayer._cast_input_dtype")),
    Transform("lora_groups", GROUP_LABEL,
              "q/k/v and gate/up that all took the fused 4-bit LoRA function", KERNELS,
              patching.apply_lora_groups),
    Transform("fused_loss", "lm_head + cross-entropy", "the causal LM's loss (a plain, trained, "
              "LoRA or tied head; no logit soft-cap)", KERNELS, _apply_fused_loss,
              ("ForCausalLM.forward", "SoftCappedForCausalLM.forward", "ForCausalLMLoss",
               "fixed_cross_entropy"), coverage.FUSED_LOSS),
)
NAMES = tuple(t.name for t in TRANSFORMS)
_BY_NAME = {t.name: t for t in TRANSFORMS}


@dataclass(frozen=True)
class TransformChoice:
    """One line of the Plan: will this transform run, and why (not)."""

    name: str
    on: bool
    why: str

    def to_dict(self) -> dict:
        return {"name": self.name, "on": self.on, "why": self.why}


def plan_transforms(model_type: str, switches: Mapping[str, bool],
                    disabled: Iterable[str] = ()) -> tuple[TransformChoice, ...]:
    """Which TRANSFORMS will run for a model of `model_type`, decided before loading.

    switches: the Plan's value for each Transform.switch (a missing one counts as off).
    disabled: names to leave off (training.disabled_transforms, for A/B comparisons).

    Raises:
        ConfigError: a name in `disabled` is not a transform.
    """
    disabled = set(disabled)
    unknown = sorted(disabled - set(NAMES))
    if unknown:
        from ..errors import ConfigError

        raise ConfigError({"training.disabled_transforms": f"no transform named {', '.join(unknown)}; "
                           f"the names are {', '.join(NAMES)}"})
    choices = []
    for t in TRANSFORMS:
        if t.name in disabled:
            choices.append(TransformChoice(t.name, False, "off: listed in training.disabled_transforms"))
        elif not switches.get(t.switch, False):
            choices.append(TransformChoice(t.name, False, f"off: {t.switch} is off"))
        elif t.architectures is not None and t.architectures.reason(model_type):
            choices.append(TransformChoice(t.name, False, f"off: {t.architectures.reason(model_type)}"))
        else:
            reason = _library_reason(t, model_type)
            choices.append(TransformChoice(t.name, reason is None, reason or f"on: {t.applies_to}"))
    return tuple(choices)


def _library_reason(t: Transform, model_type: str) -> str | None:
    """upstream.check of each definition t replaces that applies to model_type (None: all known)."""
    folder = coverage.MODELING_FOLDER.get(model_type, model_type)
    for key in t.replaces:
        for where in upstream.KNOWN[key].where:
            module_name, qualname = where.split(":")
            if ".models." in module_name and f".models.{folder}." not in module_name:
                continue
            obj = _lookup(module_name, qualname)
            if obj is not None:
                try:   # transformers >= 5.25 holds some functions in a kernels Func module
                    obj = upstream.unwrap_hub_func(obj)
                except ValueError as exc:
                    return upstream.warn_once(f"{upstream.KNOWN[key].off} off: {exc}")
                reason = upstream.check(key, obj)
                if reason:
                    return reason
    return None


def _lookup(module_name: str, qualname: str):
    import importlib

    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:   # not installed, or broken: the instance checks at apply time decide
        log.debug("cannot import %s to check it: %s", module_name, exc)
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


@dataclass
class Applied:
    """What one transform did to the model: modules changed, notes, and how to undo it."""

    name: str
    label: str
    count: int = 0
    notes: list[str] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list, repr=False)


_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, Surgery]" = weakref.WeakKeyDictionary()


class Surgery:
    """The transforms applied to one model; `loss` and `revert` are what the trainer calls."""

    def __init__(self, model: nn.Module, backend: str = "auto", defer_head_grad: bool = False):
        from cpt_studio.kernels import triton_available

        self.model, self.backend, self.defer_head_grad = model, backend, defer_head_grad
        self.impl = "Triton" if triton_available() and backend != "torch" else "PyTorch"
        self.recompute = Recompute()
        self.applied: list[Applied] = []
        self.skipped: list[TransformChoice] = []
        self.fused_loss = False
        self.facts: dict = {}   # numbers a transform reports (freed_bytes)
        self._current: Applied | None = None

    # --- used by the transforms -------------------------------------------------------------
    def bind(self, module: nn.Module, forward, label: str | None = None) -> None:
        """Binds `forward` (self = module) as module.forward, counted under label, undone on revert."""
        current = module.__dict__.get("forward")
        module.forward = types.MethodType(forward, module)

        def undo():
            if current is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = current

        self.on_undo(undo)
        self.count(1, label)

    def count(self, n: int, label: str | None = None) -> None:
        if n:
            if label is not None and label != self._current.label:
                self._current = self._sub(label)
            self._current.count += n

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._current.undo.append(fn)

    def note(self, text: str) -> None:
        self._current.notes.append(text)

    def noted(self, reason: str | None) -> bool:
        """Adds an upstream.check reason once; True when there was one."""
        if reason and reason not in self.notes:
            self.note(reason)
        return bool(reason)

    def _sub(self, label: str) -> Applied:
        """A second counter of one transform (lora_forwards: linear and 4-bit layers)."""
        parent = self._current
        for a in self.applied:
            if a.name == parent.name and a.label == label:
                return a
        sub = Applied(parent.name, label, undo=parent.undo, notes=parent.notes)
        self.applied.append(sub)
        return sub

    # --- used by the trainer ----------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        return {a.label: a.count for a in self.applied if a.count}

    @property
    def notes(self) -> list[str]:
        return _unique_notes(self.applied)

    def loss(self, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token loss (labels shifted inside, -100 ignored), as model(...).loss."""
        if self.fused_loss:
            try:
                return fused_causal_lm_loss(model, input_ids, labels, attention_mask, backend=self.backend,
                                            defer_head_grad=self.defer_head_grad)
            except UnsupportedHead as exc:  # the head changed since (adapter switched)
                log.info("fused loss skipped: %s", exc)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss

    def revert(self) -> None:
        """Undoes every transform, the last applied first; safe to call twice."""
        for applied in reversed(self.applied):
            while applied.undo:
                applied.undo.pop()()
            applied.count = 0   # the notes stay: what was left stock, and why
        self.fused_loss = False
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def summary(self, only: Iterable[str] | None = None) -> list[str]:
        """One line per transform that changed modules, then the notes (what stayed stock, why);
        `only`: these transform names."""
        names = None if only is None else set(only)
        applied = [a for a in self.applied if names is None or a.name in names]
        if not applied:
            return ["kernels off: transformers' own forward and loss"]
        return [f"{a.label}: {a.count} modules" for a in applied if a.count] + _unique_notes(applied)


def _unique_notes(applied: list[Applied]) -> list[str]:
    """The notes of `applied` in order, each once (a transform's sub-counters share its notes)."""
    seen: list[str] = []
    for a in applied:
        seen += [n for n in a.notes if n not in seen]
    return seen


def apply_transforms(model: nn.Module, choices: Iterable[TransformChoice | str], backend: str = "auto",
                     defer_head_grad: bool = False) -> Surgery:
    """Applies the chosen transforms (TransformChoice with on=True, or names) in TRANSFORMS' order.

    Raises:
        RuntimeError: transforms are already applied to this model (revert that surgery first).
        KeyError: an unknown transform name.
    """
    wanted = {c if isinstance(c, str) else c.name for c in choices if isinstance(c, str) or c.on}
    for name in wanted:
        _BY_NAME[name]
    if model in _ACTIVE:
        raise RuntimeError("Kernels are already applied to this model; revert() the earlier patch first")
    surgery = Surgery(model, backend, defer_head_grad)
    for t in TRANSFORMS:
        if t.name not in wanted:
            continue
        surgery._current = Applied(t.name, t.label.format(impl=surgery.impl))
        surgery.applied.append(surgery._current)
        t.apply(model, surgery)
    surgery._current = None
    _ACTIVE[model] = surgery
    log.info("speed transforms: %s", "; ".join(surgery.summary()))
    return surgery


KERNEL_TRANSFORMS = tuple(t.name for t in TRANSFORMS if t.switch == KERNELS)


def apply_kernels(model: nn.Module, enabled: bool = True, backend: str = "auto",
                  defer_head_grad: bool = False) -> Surgery:
    """The kernel transforms alone (training.kernels); each leaves the modules of an architecture
    it does not cover (engine/speed/coverage.py) stock, with the reason in the notes."""
    if not enabled:
        return Surgery(model, backend, defer_head_grad)
    return apply_transforms(model, KERNEL_TRANSFORMS, backend, defer_head_grad)
