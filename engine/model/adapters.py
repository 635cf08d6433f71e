"""LoRA and trainable embeddings on a loaded base model, and the two optimizer groups.

    model = attach_adapters(base, cfg.adapter)                   # or init_from=<adapter folder>
    groups = embedding_param_groups(model, 2e-4, 2e-5)           # EMBEDDINGS_GROUP + LORA_GROUP
    optimizer = torch.optim.AdamW(groups)

embed_tokens and lm_head are each off, `full` (a trained copy, peft modules_to_save) or `lora`.
With tied embeddings the two are one matrix: `full` on either side trains one shared copy; `lora`
puts one LoRA on the shared matrix, applied on the input side by peft's Embedding layer and on the
output side by `TiedLoraHead`, which reuses the same A/B tensors and adds nothing at merge time (the
embedding's merge already updated the shared matrix; peft alone would merge the delta twice).
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# The two optimizer groups' names, as saved in optimizer states, RunStarted.param_groups and the
# logs (so never renamed): trainable embed_tokens / lm_head tensors, and everything else (LoRA).
EMBEDDINGS_GROUP = "embeddings"
LORA_GROUP = "other"

# Names of the parts inside a peft tuner layer; discovery reports the layer, never these.
_TUNER_PARTS = ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                "lora_dropout", "modules_to_save", "original_module", "lora_magnitude_vector")


def discover_target_modules(model: nn.Module) -> list[str]:
    """Short names (q_proj, down_proj, ...) of the Linear modules inside the decoder layers."""
    return list(linear_shapes(model))


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{short name: (in_features, out_features)} of the decoder layers' Linear modules, in order."""
    skip = {id(m) for m in embedding_modules(model) if m is not None}
    shapes: dict[str, tuple[int, int]] = {}
    for layer in _decoder_layers(model):
        for name, module in layer.named_modules():
            parts = name.split(".")
            if not name or id(module) in skip or any(p in _TUNER_PARTS for p in parts[:-1]):
                continue
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            if parts[-1] in _TUNER_PARTS or not _is_linear(base):
                continue
            shapes.setdefault(parts[-1], _features(base))
    return shapes


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear; GPT-2 style models use Conv1D.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    return int(module.weight.shape[0]), int(module.weight.shape[1])   # Conv1D stores (in, out)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (model.layers, transformer.h, ...): the ModuleList holding the most
    parameters, so a list of MoE experts inside each layer never wins over the layers."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return [model]
    return list(max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters())))


def embedding_modules(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(input, output) embedding modules of a model or PeftModel, as currently installed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            found.append(getattr(base, getter)())
        except (AttributeError, NotImplementedError):
            found.append(None)
    return found[0], found[1]


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


class TiedLoraHead(nn.Module):
    """Output head of a tied model whose shared matrix W carries a LoRA on the embedding side.

    The embedding LoRA stores A (r, vocab) and B (hidden, r), so the shared matrix is
    W' = W + s * A.T @ B.T and the head computes x @ W'.T = x @ W.T + s * (x @ B) @ A. A and B are
    read from the embedding layer at every call: one tensor each, gradients from both sides add up.
    """

    def __init__(self, base_layer: nn.Module, embedding_lora: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self._embedding = [embedding_lora]   # a list, so its parameters are not registered twice

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        emb = self._embedding[0]
        if emb.disable_adapters or emb.merged:   # merged: W already holds the delta
            return out
        for name in emb.active_adapters:
            if name in emb.lora_embedding_A:
                a, b = emb.lora_embedding_A[name], emb.lora_embedding_B[name]
                h = emb.lora_dropout[name](x) if name in emb.lora_dropout else x
                out = out + ((h.to(b.dtype) @ b) @ a).to(out.dtype) * emb.scaling[name]
        return out

    def unload_and_optionally_merge_module(self, merge: bool = True, safe_merge: bool = False,
                                           adapter_names=None) -> nn.Module:
        """Called by peft's merge_and_unload: the plain head; the embedding merges W once."""
        return self.base_layer


def attach_adapters(model: nn.Module, cfg: AdapterConfig, init_from: str = ""):
    """Wrap `model` in a PeftModel with LoRA and the embed_tokens / lm_head modes of `cfg`.

    Args:
        model: a base causal LM from `load_base_model` (maybe 4-bit or 8-bit).
        cfg: LoRA rank/alpha/dropout/rsLoRA, target modules (empty = discovered) and the
            embed_tokens / lm_head modes. Ignored when `init_from` is given (the adapter's own
            settings apply).
        init_from: an adapter or checkpoint folder to continue training from ("" = fresh).

    Raises:
        ConfigError: a target module name is not a Linear module of the model.
        CheckpointError: `init_from` is not an adapter, or was trained on a different base.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    inp, out = embedding_modules(model)
    tied = out is not None and inp is not None and out.weight is inp.weight
    with warnings.catch_warnings():
        # peft warns about tied layers in the adapter; ties are handled here (see TiedLoraHead).
        warnings.filterwarnings("ignore", message=r".*(tie_word_embeddings|ensure_weight_tying).*")
        if tied:   # tied adapters hold the head's LoRA only as the embedding's A/B (TiedLoraHead)
            head_keys = r"\[('[^']*\.lm_head\.lora_[AB]\.[^']*'(, )?)+\]"
            warnings.filterwarnings("ignore", message="Found missing adapter keys while loading the "
                                    "checkpoint: " + head_keys)
        if init_from:
            _check_adapter_fits(model, Path(init_from))
            try:
                peft_model = PeftModel.from_pretrained(model, str(init_from), is_trainable=True)
            except (ValueError, RuntimeError, KeyError, OSError) as exc:
                reason = "; ".join(str(exc).strip().splitlines()[:3])   # peft lists every tensor
                raise CheckpointError(f"Adapter {init_from} does not fit this base model: {reason}",
                                      "Pick the base model the adapter was trained on.") from None
            log.info("continuing from adapter %s (its own LoRA settings apply)", init_from)
        else:
            peft_model = get_peft_model(model, _lora_config(model, cfg, inp, out, tied, LoraConfig))
    if tied:
        _tie_lora_head(peft_model)
    if getattr(model, "hf_quantizer", None) is not None:
        # Gradient checkpointing needs inputs that require grad when the embeddings are frozen.
        # peft's prepare_model_for_kbit_training would also upcast every non-quantized weight
        # (embeddings included) to fp32, which costs GBs on large vocabularies: not done here.
        peft_model.enable_input_require_grads()
    return peft_model


def _lora_config(model, cfg: AdapterConfig, inp, out, tied: bool, lora_config_cls):
    available = discover_target_modules(model)
    targets = list(cfg.target_modules) or available
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ConfigError({"adapter.target_modules": (
            f"{', '.join(map(repr, unknown))} not found among this model's Linear modules; "
            f"available: {', '.join(available)} (embed_tokens and lm_head have their own settings)")})
    emb_name = _module_name(model, inp).rsplit(".", 1)[-1]
    head_name = _module_name(model, out).rsplit(".", 1)[-1] if out is not None else ""
    modes = {emb_name: cfg.embed_tokens, head_name: cfg.lm_head if out is not None else "off"}
    if tied:
        # One matrix: a full copy on either side wins over lora, lora over off.
        mode = next((m for m in ("full", "lora") if m in modes.values()), "off")
        if cfg.embed_tokens != cfg.lm_head:
            log.info("tied embeddings: embed_tokens=%s, lm_head=%s -> one shared matrix, %s",
                     cfg.embed_tokens, cfg.lm_head, mode)
        modes = {emb_name: mode}   # peft ties lm_head to embed_tokens (ensure_weight_tying)
    full = [name for name, mode in modes.items() if mode == "full"]
    lora = [name for name, mode in modes.items() if mode == "lora"]
    return lora_config_cls(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
        target_modules=targets + lora, modules_to_save=full or None, task_type="CAUSAL_LM",
        ensure_weight_tying=tied and bool(full or lora))


def _tie_lora_head(peft_model) -> None:
    """Swap peft's tied lm_head LoRA (separate aliasing tensors, merged twice) for TiedLoraHead."""
    inp, out = embedding_modules(peft_model)
    if not (hasattr(inp, "lora_embedding_A") and hasattr(out, "lora_A")):
        return
    base = peft_model.get_base_model()
    parent_name, _, attr = _module_name(base, out).rpartition(".")
    parent = base.get_submodule(parent_name) if parent_name else base
    setattr(parent, attr, TiedLoraHead(out.get_base_layer(), inp))


def _check_adapter_fits(model: nn.Module, folder: Path) -> None:
    """Refuse an adapter folder that is missing or was trained on another vocabulary."""
    from safetensors import safe_open

    hint = "Pick an adapter or checkpoint folder trained on this base model."
    weights = folder / "adapter_model.safetensors"
    if not (folder / "adapter_config.json").is_file() or not weights.is_file():
        raise CheckpointError(f"{folder} is not an adapter or checkpoint folder (expected "
                              "adapter_config.json and adapter_model.safetensors).", hint)
    try:
        json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {key: fh.get_slice(key).get_shape() for key in fh.keys()}
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"Adapter {folder} is unreadable ({exc}).", hint) from None
    inp, out = embedding_modules(model)
    vocab = inp.weight.shape[0]
    names = [_module_name(model, m).rsplit(".", 1)[-1] for m in (inp, out) if m is not None]
    for key, shape in shapes.items():
        if not any(f".{n}." in key for n in names):
            continue
        rows = shape[-1] if "lora_embedding_A" in key else shape[0]
        if "lora_A" not in key and "lora_embedding_B" not in key and rows != vocab:
            raise CheckpointError(f"Adapter {folder} was trained on a vocabulary of {rows} tokens; "
                                  f"this base model has {vocab} ({key}).", hint)


def embedding_param_groups(model: nn.Module, learning_rate: float, embedding_lr: float,
                           weight_decay: float = 0.0) -> list[dict]:
    """Two AdamW groups: every trainable embed_tokens / lm_head tensor, and everything else.

    Membership is by module identity: the subtrees of the model's input and output embedding
    modules (peft wrappers included: trained copies, LoRA A/B, embedding A/B). A tensor shared by
    tied modules is listed once.
    """
    emb_ids = {id(p) for m in embedding_modules(model) if m is not None for p in m.parameters()}
    embeddings, other = [], []
    for param in model.parameters():   # yields each shared tensor once
        if param.requires_grad:
            (embeddings if id(param) in emb_ids else other).append(param)
    return [
        {"params": embeddings, "lr": embedding_lr, "weight_decay": weight_decay,
         "name": EMBEDDINGS_GROUP},
        {"params": other, "lr": learning_rate, "weight_decay": weight_decay, "name": LORA_GROUP},
    ]


def describe_param_groups(groups: list[dict]) -> dict:
    """{group name: {"lr", "params" (elements), "tensors"}} for logs and RunStarted."""
    return {g["name"]: {"lr": g["lr"], "params": sum(p.numel() for p in g["params"]),
                        "tensors": len(g["params"])} for g in groups}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        n = int(quant_state.shape.numel()) if quant_state is not None else param.numel()
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
