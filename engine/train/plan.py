"""The Plan: every decision a run's `auto` settings lead to, made in one place, each with its reason.

    plan = resolve(cfg, "cuda", describe_model(resolved))
    plan.embedding_optimizer, plan.why["embedding_optimizer"]    # "fused8bit", "auto: CUDA with Triton"
    log.info("\\n".join(plan.lines()))

`setup_training` resolves it once and every consumer reads it: the base model's precision, the
trained embeddings' storage and gradient, the optimizers, checkpointing and its offload, the loss
function's kernels and autocast. The VRAM estimate resolves the same Plan for a CUDA device, so
what it counts is what a run on that GPU does. RunStarted carries `plan.to_dict()`.

Each decision is a small rule in RULES, applied in that order. A rule sees the config, the device
type, the model's description (ModelInfo, or None), what the installed software can do (Facts)
and the decisions made before it, and returns (value, why). An explicit setting that cannot hold
raises ConfigError here, before anything is loaded.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..config import RunConfig
from ..errors import ConfigError
from ..model.loading import resolve_precision
from ..speed.registry import TransformChoice, plan_transforms

SET = "set in the config"


@dataclass(frozen=True)
class Facts:
    """What this machine's software and GPU can do, as far as the rules care."""

    triton: bool          # Triton importable: our kernels and fused8bit run compiled on CUDA
    bitsandbytes: bool    # bitsandbytes installed: adamw8bit and 4/8-bit loading
    cuda_bf16: bool       # the GPU computes in bf16 (assumed True when planning for a GPU not here)
    gpu_here: bool        # a CUDA GPU is present (False: the CUDA facts are assumptions)


def probe_facts(device_type: str) -> Facts:
    """Facts of this machine; nothing heavy is imported (bitsandbytes is only looked up)."""
    from cpt_studio.kernels import triton_available

    gpu = torch.cuda.is_available()
    return Facts(triton=triton_available(),
                 bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
                 cuda_bf16=torch.cuda.is_bf16_supported() if gpu and device_type == "cuda" else True,
                 gpu_here=gpu)


@dataclass(frozen=True)
class Inputs:
    """What a rule decides from (the decisions before it come as a second argument)."""

    cfg: RunConfig
    device: str                 # "cuda" | "cpu" | "mps"
    info: Any                   # ModelInfo (engine.model.source) or None
    facts: Facts

    @property
    def full_copies(self) -> bool:
        """Is embed_tokens or lm_head fully trained (a peft modules_to_save copy)?"""
        return "full" in (self.cfg.adapter.embed_tokens, self.cfg.adapter.lm_head)


Rule = Callable[[Inputs, dict], tuple[Any, str]]


def _precision(i: Inputs, d: dict) -> tuple[str, str]:
    value = resolve_precision(i.cfg.model.precision, i.device)   # the function load_base_model uses
    if i.cfg.model.precision != "auto":
        return value, SET
    return value, "auto: NF4 4-bit on CUDA" if value == "4bit" else f"auto: {value} without CUDA"


def _autocast(i: Inputs, d: dict) -> tuple[str, str]:
    if i.device != "cuda":
        return "", f"off: {i.device.upper()} computes in the weights' dtype"
    if not i.facts.cuda_bf16:
        return "", "off: this GPU has no bf16"
    return "bf16", "CUDA with bf16" + ("" if i.facts.gpu_here else ", assumed (no GPU here)")


def _kernels(i: Inputs, d: dict) -> tuple[bool, str]:
    mode = i.cfg.training.kernels
    if mode != "auto":
        return mode == "on", SET
    if i.device != "cuda":
        return False, "auto: on only with CUDA"
    return True, "auto: CUDA with Triton" if i.facts.triton else "auto: CUDA, PyTorch ops (no Triton)"


def _embedding_optimizer(i: Inputs, d: dict) -> tuple[str, str]:
    choice = i.cfg.training.embedding_optimizer
    if choice == "adamw8bit" and not i.facts.bitsandbytes:
        raise ConfigError({"training.embedding_optimizer": "adamw8bit needs bitsandbytes, which "
                                                           "is not installed; use adamw or fused8bit"})
    if choice != "auto":
        return choice, SET
    if i.device != "cuda":
        # bitsandbytes' 8-bit step is ~4x slower than torch's on CPU; Triton only runs interpreted.
        return "adamw", f"auto: torch AdamW on {i.device.upper()}"
    if d["kernels"] and i.facts.triton:
        return "fused8bit", "auto: CUDA with Triton"
    why = "kernels off" if not d["kernels"] else "no Triton"
    if i.facts.bitsandbytes:
        return "adamw8bit", f"auto: CUDA, {why}"
    return "adamw", f"auto: CUDA, {why}, no bitsandbytes"


def _lora_optimizer(i: Inputs, d: dict) -> tuple[str, str]:
    return i.cfg.training.lora_optimizer, SET


def _embedding_weights(i: Inputs, d: dict) -> tuple[str, str]:
    """bf16 copies need fused8bit (stochastic rounding keeps small updates) and bf16 autocast."""
    choice, kind = i.cfg.training.embedding_weights, d["embedding_optimizer"]
    if choice == "fp32":
        return "fp32", SET
    sound = kind == "fused8bit" and d["autocast"] == "bf16"
    if choice == "bf16":
        if not sound:
            why = ("needs bf16 autocast, i.e. a CUDA GPU with bf16" if kind == "fused8bit" else
                   f"needs embedding_optimizer fused8bit, and it resolved to {kind} here")
            raise ConfigError({"training.embedding_weights": f"bf16 {why}; use fp32 or auto"})
        return "bf16", SET
    if not i.full_copies:
        return "fp32", "auto: no fully trained embed_tokens/lm_head copy"
    if sound:
        return "bf16", "auto: fused8bit (stochastic rounding) under bf16 autocast"
    return "fp32", ("auto: bf16 needs bf16 autocast" if kind == "fused8bit" else
                    f"auto: bf16 needs fused8bit, the embedding optimizer is {kind}")


def _sparse_embedding_grad(i: Inputs, d: dict) -> tuple[bool, str]:
    if not i.cfg.training.sparse_embedding_grad:
        return False, SET
    if i.cfg.adapter.embed_tokens != "full":
        return False, "off: embed_tokens is not fully trained"
    if d["embedding_optimizer"] != "fused8bit":
        return False, f"off: only fused8bit reads it; the embedding optimizer is {d['embedding_optimizer']}"
    if i.info is None:
        return True, "on: fused8bit; untied embeddings assumed (no model description)"
    if i.info.tied_embeddings:
        return False, "off: tied embeddings (lm_head's gradient is dense)"
    return True, "on: untied embed_tokens with fused8bit"


def _free_frozen_embeddings(i: Inputs, d: dict) -> tuple[bool, str]:
    if not i.cfg.training.free_frozen_embeddings:
        return False, SET
    if not i.full_copies:
        return False, "off: no fully trained copy, so no frozen original beside it"
    return True, "on: unused while training"


def _stream_in_compute_dtype(i: Inputs, d: dict) -> tuple[bool, str]:
    if not i.cfg.training.stream_in_compute_dtype:
        return False, SET
    if not d["autocast"]:
        return False, "off: no autocast, the stream stays in the weights' dtype"
    return True, f"on: embedding output cast to {d['autocast']}"


def _gradient_checkpointing(i: Inputs, d: dict) -> tuple[bool, str]:
    return bool(i.cfg.training.gradient_checkpointing), SET


def _unchecked_layers(i: Inputs, d: dict) -> tuple[int, str]:
    wanted = int(i.cfg.training.unchecked_layers)
    if not wanted:
        return 0, "every decoder layer checkpointed"
    if not d["gradient_checkpointing"]:
        return 0, "gradient checkpointing is off: every layer keeps its activations"
    layers = int(getattr(i.info, "n_layers", 0) or 0)
    if layers and wanted >= layers:
        return layers, f"all {layers} layers: as good as gradient checkpointing off"
    return wanted, "the last layers keep their activations (no recompute in the backward)"


def _offload_checkpoints(i: Inputs, d: dict) -> tuple[bool, str]:
    mode = i.cfg.training.offload_checkpoints
    if not d["gradient_checkpointing"]:
        return False, "off: gradient checkpointing is off"
    if mode != "auto":
        return mode == "on", SET
    if i.device != "cuda":
        return False, "auto: on only with CUDA"
    return True, "auto: CUDA, to pinned host memory"


def _defer_head_grad(i: Inputs, d: dict) -> tuple[bool, str]:
    if not i.cfg.training.defer_head_grad:
        return False, SET
    if not d["kernels"]:
        return False, "off: needs the kernels' fused loss"
    return True, "on: with the kernels' fused loss"


# Applied in this order; each rule may read the decisions of the rules above it.
RULES: dict[str, Rule] = {
    "precision": _precision,
    "autocast": _autocast,
    "kernels": _kernels,
    "embedding_optimizer": _embedding_optimizer,
    "lora_optimizer": _lora_optimizer,
    "embedding_weights": _embedding_weights,
    "sparse_embedding_grad": _sparse_embedding_grad,
    "free_frozen_embeddings": _free_frozen_embeddings,
    "stream_in_compute_dtype": _stream_in_compute_dtype,
    "gradient_checkpointing": _gradient_checkpointing,
    "offload_checkpoints": _offload_checkpoints,
    "defer_head_grad": _defer_head_grad,
    "unchecked_layers": _unchecked_layers,
}

LABELS = {
    "precision": "Base weights", "autocast": "Autocast", "kernels": "Kernels",
    "embedding_optimizer": "Embeddings optimizer", "lora_optimizer": "LoRA optimizer",
    "embedding_weights": "Trained embedding copies", "sparse_embedding_grad": "Sparse embed_tokens grad",
    "free_frozen_embeddings": "Free frozen originals", "stream_in_compute_dtype": "bf16 residual stream",
    "gradient_checkpointing": "Gradient checkpointing", "unchecked_layers": "Layers not checkpointed",
    "offload_checkpoints": "Offload checkpoints",
    "defer_head_grad": "Deferred lm_head grad",
}


@dataclass(frozen=True)
class Plan:
    """What a run will do; `why[name]` says why for each decision."""

    device: str                    # device type: "cuda" | "cpu" | "mps"
    precision: str                 # the base as loaded: fp32 | bf16 | fp16 | 8bit | 4bit
    autocast: str                  # "bf16", or "" for no autocast
    kernels: bool                  # our Triton kernels (or their PyTorch references) on the model
    embedding_optimizer: str       # embeddings group: adamw | adamw8bit | fused8bit
    lora_optimizer: str            # LoRA group: adamw | fused8bit
    embedding_weights: str         # storage of fully trained embed_tokens/lm_head copies: bf16 | fp32
    sparse_embedding_grad: bool    # embed_tokens' gradient holds only the batch's rows
    free_frozen_embeddings: bool   # peft's frozen originals of the trained copies released
    stream_in_compute_dtype: bool  # fp32 embedding output cast to the autocast dtype
    gradient_checkpointing: bool
    offload_checkpoints: bool      # checkpointed layer inputs in host memory
    defer_head_grad: bool          # a trained lm_head's gradient after the layers' backward
    unchecked_layers: int = 0      # the last N decoder layers run without checkpointing
    model_type: str = ""           # from the model description ("llama", ...), "" when unknown
    why: dict = field(default_factory=dict, hash=False)   # decision name -> reason
    transforms: tuple = ()         # per-module speed transforms (engine/speed/registry.py)

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return {"bf16": torch.bfloat16}.get(self.autocast)

    def switches(self) -> dict[str, bool]:
        """The on/off decisions, by name (the switches engine/speed's transforms ask for)."""
        values = {name: getattr(self, name) for name in RULES}
        return {name: value for name, value in values.items() if isinstance(value, bool)}

    def lines(self) -> list[str]:
        """Human-readable, one decision a line: "Kernels: on — auto: CUDA with Triton"."""
        where = f"{self.device.upper()}" + (f", {self.model_type} model" if self.model_type else "")
        out = [f"Device: {where}"]
        for name in RULES:
            value = getattr(self, name)
            shown = ("on" if value else "off") if isinstance(value, bool) else (value or "off")
            why = self.why.get(name, "?").removeprefix(f"{shown}: ")   # "off: ..." after "off"
            out.append(f"{LABELS[name]}: {shown} — {why}")
        choices = [t.to_dict() if hasattr(t, "to_dict") else dict(t) for t in self.transforms]
        if choices:
            on = [c["name"] for c in choices if c.get("on")]
            out.append(f"Speed transforms: {', '.join(on) if on else 'none'}")
            # an "off" that the switches above do not already explain: the architecture, a
            # library version, training.disabled_transforms
            out += [f"{c['name']}: {c.get('why', '')}" for c in choices
                    if not c.get("on") and not c.get("why", "").endswith(" is off")]
        return out

    def to_dict(self) -> dict:
        """JSON-safe; `lines` is included for readers that cannot import engine.train."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["why"] = dict(self.why)
        data["transforms"] = [t.to_dict() if hasattr(t, "to_dict") else dict(t) for t in self.transforms]
        data["lines"] = self.lines()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """The Plan of `to_dict`. Raises ValueError when incomplete."""
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
        missing = sorted((set(RULES) | {"device"}) - optional - set(data))
        if missing:
            raise ValueError(f"a plan needs {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in names}
        values["why"] = dict(values.get("why") or {})
        values["transforms"] = tuple(TransformChoice(c["name"], bool(c["on"]), c.get("why", ""))
                                     if isinstance(c, dict) else c for c in values.get("transforms") or ())
        return cls(**values)


def resolve(config: RunConfig, device: str | torch.device, model_info: Any = None, *,
            facts: Optional[Facts] = None) -> Plan:
    """Every `auto` of `config` decided for `device`, with the reasons.

    Args:
        config: the run config.
        device: where the run trains ("cuda", "cuda:1", "cpu", a torch.device). "cuda" on a machine
            without a GPU plans for one (the VRAM estimate): bf16 is assumed.
        model_info: the base model's ModelInfo (describe_model); tied embeddings and the model
            type come from it. None: untied assumed.
        facts: what the machine can do; probed when None.

    Raises:
        ConfigError: an explicit setting that cannot hold on this device.
    """
    device_type = torch.device(device).type
    inputs = Inputs(config, device_type, model_info, facts or probe_facts(device_type))
    values: dict[str, Any] = {}
    why: dict[str, str] = {}
    for name, rule in RULES.items():
        values[name], why[name] = rule(inputs, values)
    model_type = str(getattr(model_info, "model_type", "") or "")
    switches = {name: value for name, value in values.items() if isinstance(value, bool)}
    transforms = plan_transforms(model_type, switches, config.training.disabled_transforms)
    return Plan(device=device_type, model_type=model_type, why=why, transforms=transforms, **values)
