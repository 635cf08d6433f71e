"""A rough GPU-memory estimate for a training run, made before any weight is loaded.

    info = describe_model(resolve_model_source(cfg.model.source, ws.models_dir))
    plan = resolve(cfg, "cuda", info)                          # engine/train/plan.py
    est = estimate_vram(info, cfg, plan)
    fit_badge(est.total, gpu_total_memory() or 24 * GIB)      # "fits" | "tight" | "won't fit"

The estimate is a sum of the big terms; it is meant to be right to within about 20-30%, enough to
tell a 24 GB card from an 80 GB one, not to predict the allocator's peak. Every choice a setting's
`auto` leads to (precision, optimizers, embedding storage, sparse gradient, offload, kernels,
freed originals) is read from the run's Plan for a CUDA device, the same decisions setup_training
acts on. Terms (bytes):

- base weights, frozen: Linear weights at the precision's bytes/param (fp32 4, bf16/fp16 2, 8bit 1
  + one fp32 scale per row ~ 1.0, 4bit NF4 0.5 + quant constants: 4-byte absmax per 64 weights
  = 0.0625, or ~0.016 with double quantization, which we use). embed_tokens and lm_head are never
  quantized by bitsandbytes: they stay at 2 B/param (4 for fp32). The precision is the plan's
  (`auto`: 4bit on CUDA).
- LoRA: r * (in + out) params per adapted Linear per layer, each with an fp32 weight, gradient and
  two AdamW moments = 16 B/param (10 with the plan's LoRA optimizer fused8bit: 8-bit moments).
  Shapes come from `linear_module_shapes` when the model info has it, else from the name (gate/up/fc1: hidden -> intermediate, down/fc2: intermediate -> hidden,
  k/v: hidden -> kv dim, everything else hidden -> hidden).
- trainable embeddings: a `full` embed_tokens or lm_head is a trained copy of vocab x hidden:
  weight + gradient in the plan's embedding storage, bf16 (2 + 2 B/param) or fp32 (4 + 4), plus
  the plan's embeddings optimizer's moments: 8 B for adamw, 2 B as 8-bit states (adamw8bit,
  fused8bit); with the plan's sparse embedding gradient embed_tokens' gradient holds only
  batch x seq rows. `lora` is r * (vocab + hidden) params, fp32 (4 + 4 + moments); with tied
  embeddings the two are one matrix and counted once. When the plan frees the frozen originals,
  those of fully trained copies leave the base-weights term.
- activations, per token and layer, in the compute dtype (2 B, 4 for fp32), assuming SDPA/flash
  attention (no seq x seq score matrix is kept):
  `8 * hidden + 2 * kv_dim + 4 * intermediate` values (norm outputs, q/k/v, attention output,
  residuals, gate/up, activation, product) -> x batch x seq x layers. With gradient checkpointing
  only each layer's input (hidden values) is kept, plus one layer's full set during recompute
  (the plan's unchecked layers, the last N, keep their full set each);
  when the plan offloads checkpoints those inputs sit in CPU memory instead, but for the
  one prefetched back during the layer above's backward.
- logits: batch x seq x vocab x 4 B (fp32 for the loss), x2 for their gradient; with the plan's
  kernels on, the fused loss holds one chunk of at most 2048 rows in bf16 (and its gradient).
- CUDA context and allocator slack: a flat 500 MB.

Before the first step, `check_step_memory` compares what one step adds to the loaded model (the
terms above but the base weights, for the micro-batch the sampler will really draw) with the memory
the device has free: free GPU memory on CUDA, else the RAM psutil reports available (the cgroup's
limit counts in a container). The estimate stays under a real step's peak (UNDERCOUNT has the
measurements), so the check refuses only a step that cannot fit, and warns where it may not.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError
from .plan import Plan, resolve

log = logging.getLogger(__name__)

GIB = 1024 ** 3
CUDA_CONTEXT_BYTES = 500 * 1024 ** 2
TIGHT_FRACTION = 0.85

# Bytes per parameter of a frozen Linear weight.
LINEAR_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "8bit": 1.0 + 4 / 4096, "4bit": 0.5 + 0.016}
TRAINABLE_BYTES = 16.0        # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
FUSED_CE_CHUNK_ROWS = 2048    # rows of logits the fused loss (kernels on) materialises at once
ACT_HIDDEN, ACT_KV, ACT_INTERMEDIATE = 8, 2, 4
# How far a real step's peak can exceed the estimate (step_memory) without the fused loss. Measured
# 2026-12-05 on CPU, SmolLM2-135M fp32, seq 512, peak RSS above the loaded model against the
# estimate: batch 4 2.98 vs 1.46 GiB, 16: 10.50 vs 4.36, 43: 16.06 vs 10.9 (not linear in the
# batch). The estimate stays below every measured peak, so refusing above it refuses no step that
# fits; between 1/UNDERCOUNT and 1 of the free memory the check only warns.
UNDERCOUNT = 2.5

_UP_NAMES = ("gate", "up", "fc1", "w1", "w3", "c_fc", "dense_h_to_4h")
_DOWN_NAMES = ("down", "fc2", "w2", "dense_4h_to_h")
_KV_NAMES = ("k_proj", "v_proj", "key", "value")


@dataclass(frozen=True)
class VramEstimate:
    """Estimated GPU memory of a training run, in bytes per term."""

    precision: str
    base_weights: int
    lora: int
    embeddings: int
    activations: int
    logits: int
    overhead: int = CUDA_CONTEXT_BYTES

    @property
    def total(self) -> int:
        return (self.base_weights + self.lora + self.embeddings + self.activations + self.logits
                + self.overhead)

    def parts(self) -> list[tuple[str, int]]:
        """(label, bytes) for each term, for display."""
        return [
            (f"Base weights ({self.precision})", self.base_weights),
            ("LoRA + AdamW states", self.lora),
            ("Trained embeddings + AdamW states", self.embeddings),
            ("Activations", self.activations),
            ("Logits (+ gradient)", self.logits),
            ("CUDA context", self.overhead),
        ]


def _shape_of(info: Any) -> dict[str, int]:
    hidden = int(info.hidden_size)
    heads = int(getattr(info, "num_attention_heads", 0) or max(1, hidden // 128))
    kv_heads = int(getattr(info, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(info, "head_dim", 0) or hidden // heads)
    intermediate = int(getattr(info, "intermediate_size", 0) or round(hidden * 3.5))
    return {"hidden": hidden, "kv": kv_heads * head_dim, "intermediate": intermediate,
            "vocab": int(info.vocab_size), "layers": int(info.n_layers)}


def _linear_shape(name: str, shape: dict[str, int]) -> tuple[int, int]:
    """(in, out) features of a decoder Linear guessed from its name."""
    low = name.lower()
    h, i = shape["hidden"], shape["intermediate"]
    if any(k in low for k in _DOWN_NAMES):
        return i, h
    if any(k in low for k in _UP_NAMES):
        return h, i
    if any(k in low for k in _KV_NAMES):
        return h, shape["kv"]
    return h, h


def _lora_params(info: Any, cfg: RunConfig, shape: dict[str, int]) -> int:
    names = list(cfg.adapter.target_modules) or list(getattr(info, "linear_module_names", []) or [])
    known = dict(getattr(info, "linear_module_shapes", None) or {})
    r = cfg.adapter.r
    total = 0
    for name in names:
        fan_in, fan_out = known.get(name) or _linear_shape(name, shape)
        total += r * (fan_in + fan_out)
    return total * shape["layers"]


def _embedding_params(info: Any, cfg: RunConfig, shape: dict[str, int]) -> tuple[int, int]:
    """(fully trained, LoRA) params of embed_tokens / lm_head."""
    full = shape["vocab"] * shape["hidden"]
    lora = cfg.adapter.r * (shape["vocab"] + shape["hidden"])
    modes = [cfg.adapter.embed_tokens, cfg.adapter.lm_head]
    if getattr(info, "tied_embeddings", False):
        # One matrix: the widest mode decides, the other side follows it.
        modes = ["full"] if "full" in modes else ["lora"] if "lora" in modes else []
    return modes.count("full") * full, modes.count("lora") * lora


def _embedding_bytes(info: Any, cfg: RunConfig, plan: Plan, shape: dict[str, int]) -> float:
    """Weights + gradients + AdamW moments of the trained embed_tokens / lm_head, as the plan
    stores and updates them."""
    full, lora = _embedding_params(info, cfg, shape)
    weight = 2 if plan.embedding_weights == "bf16" else 4
    states = 2 if plan.embedding_optimizer in ("adamw8bit", "fused8bit") else 8
    total = full * (weight + weight + states) + lora * (4 + 4 + states)
    if plan.sparse_embedding_grad:
        # embed_tokens' gradient holds only the batch's rows, not vocab x hidden.
        rows = min(shape["vocab"], cfg.training.batch_size * cfg.data.seq_len)
        total -= (shape["vocab"] - rows) * shape["hidden"] * weight
    return total


def estimate_vram(info: Any, cfg: RunConfig, plan: Plan | None = None) -> VramEstimate:
    """Estimate the GPU memory of training `cfg` on the model described by `info`.

    Args:
        info: a ModelInfo (or anything with n_params, vocab_size, hidden_size, n_layers,
            tied_embeddings, linear_module_names; intermediate_size, num_attention_heads,
            num_key_value_heads, head_dim and linear_module_shapes are used when present).
        cfg: the run config (adapter, batch size, seq_len).
        plan: the run's Plan; None resolves one for a CUDA device (the estimate is for the GPU).

    Returns:
        A VramEstimate; see the module docstring for the formula of each term.

    Raises:
        ConfigError: from resolving the plan, an explicit setting that cannot hold on a GPU.
    """
    plan = plan or resolve(cfg, "cuda", info)
    shape = _shape_of(info)
    precision = plan.precision
    embed_matrices = 1 if getattr(info, "tied_embeddings", False) else 2
    embed_params = embed_matrices * shape["vocab"] * shape["hidden"]
    linear_params = max(0, int(info.n_params) - embed_params)
    embed_bytes = 4 if precision == "fp32" else 2
    base = linear_params * LINEAR_BYTES[precision] + embed_params * embed_bytes

    # fp32 weight + gradient + AdamW moments: 8 B in fp32, 2 B with the LoRA group on fused8bit
    lora_bytes = TRAINABLE_BYTES if plan.lora_optimizer == "adamw" else 4 + 4 + 2
    lora = _lora_params(info, cfg, shape) * lora_bytes
    embeddings = _embedding_bytes(info, cfg, plan, shape)
    if plan.free_frozen_embeddings:
        # The frozen originals of fully trained copies are released once training starts.
        full = [m for m in (cfg.adapter.embed_tokens, cfg.adapter.lm_head) if m == "full"]
        freed = min(len(full), embed_matrices) * shape["vocab"] * shape["hidden"] * embed_bytes
        base -= freed

    act_bytes = 4 if precision == "fp32" else 2
    tokens = cfg.training.batch_size * cfg.data.seq_len
    per_layer = (ACT_HIDDEN * shape["hidden"] + ACT_KV * shape["kv"]
                 + ACT_INTERMEDIATE * shape["intermediate"])
    if plan.gradient_checkpointing:
        # Each layer's input is kept for the recompute, in CPU memory when offloaded; there the
        # next layer's input comes back during a layer's backward (prefetch): one input.
        unchecked = min(plan.unchecked_layers, shape["layers"])
        checked = shape["layers"] - unchecked
        kept = min(1, checked) if plan.offload_checkpoints else checked
        per_token = shape["hidden"] * kept + per_layer * (unchecked + (1 if checked else 0))
    else:
        per_token = per_layer * shape["layers"]
    activations = tokens * per_token * act_bytes
    if not plan.kernels:
        logits = tokens * shape["vocab"] * 4 * 2
    else:
        # The fused linear + cross-entropy holds one chunk of bf16 logits (and its gradient) at a time.
        logits = min(tokens, FUSED_CE_CHUNK_ROWS) * shape["vocab"] * 2 * 2
    return VramEstimate(precision=precision, base_weights=int(base), lora=int(lora),
                        embeddings=int(embeddings), activations=int(activations), logits=int(logits))


def fit_badge(total: int, gpu_total: int) -> str:
    """'fits' (<= 85% of the card), 'tight' (85-100%) or "won't fit"."""
    if total > gpu_total:
        return "won't fit"
    if total > TIGHT_FRACTION * gpu_total:
        return "tight"
    return "fits"


def gpu_total_memory(device: int = 0) -> int | None:
    """Total memory of CUDA device `device` in bytes, or None without a usable GPU."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(device).total_memory)
    except Exception:  # a broken driver must not break the estimate
        return None


def gpu_name(device: int = 0) -> str | None:
    """Name of CUDA device `device`, or None without a usable GPU."""
    try:
        import torch
        return torch.cuda.get_device_name(device) if torch.cuda.is_available() else None
    except Exception:
        return None


def format_bytes(n: float) -> str:
    """'5.8 GB' style (GiB, shown as GB like most GPU tools)."""
    if n >= GIB:
        return f"{n / GIB:.1f} GB"
    return f"{n / 1024 ** 2:.0f} MB"


# ---- before the first step ------------------------------------------------------------------
def step_memory(info: Any, cfg: RunConfig, plan: Plan, batch_size: int) -> dict[str, int]:
    """What one training step of `batch_size` blocks adds to the loaded base, by term (bytes):
    trained weights with their gradients and optimizer states, activations, logits."""
    training = dataclasses.replace(cfg.training, batch_size=batch_size)
    est = estimate_vram(info, dataclasses.replace(cfg, training=training), plan)
    return {"trained weights, gradients and optimizer states": est.lora + est.embeddings,
            "activations": est.activations, "logits": est.logits}


def check_step_memory(info: Any, cfg: RunConfig, plan: Plan, batch_size: int, device,
                      loaded_trainable_bytes: int = 0) -> None:
    """Refuse, before the first step, a micro-batch whose step cannot fit in the device's memory.

    Args:
        info: the base model's ModelInfo.
        cfg: the run config (seq_len, adapter).
        plan: the run's Plan on this device.
        batch_size: blocks per micro-batch as the sampler draws them (batch_size, at most the
            number of training blocks).
        device: where the run trains.
        loaded_trainable_bytes: trained weights already in memory (the adapters), not counted twice.

    Raises:
        ConfigError: naming training.batch_size, the memory needed and free, and what to lower.
    """
    free = available_memory(device)
    if free is None:
        return

    def need(blocks: int) -> int:
        return sum(step_memory(info, cfg, plan, blocks).values()) - loaded_trainable_bytes

    total = need(batch_size)
    where = "GPU memory" if _is_cuda(device) else "RAM"
    if total <= free:
        level = logging.WARNING if total * UNDERCOUNT > free else logging.INFO
        log.log(level, "one training step needs about %s of %s; %s available%s",
                format_bytes(total), where, format_bytes(free),
                "; if the run is killed for memory, lower training.batch_size"
                if level == logging.WARNING else "")
        return
    parts = ", ".join(f"{name} {format_bytes(size)}"
                      for name, size in step_memory(info, cfg, plan, batch_size).items())
    problem = (f"one training step needs about {format_bytes(total)} of {where} for micro-batches "
               f"of {batch_size} blocks x {cfg.data.seq_len} tokens ({parts}); "
               f"{format_bytes(free)} of {where} is available")
    def largest(budget: float) -> int:
        low, high = 0, batch_size    # the largest batch within budget lies in [low, high)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if need(mid) <= budget else (low, mid)
        return low

    # The batch to suggest is one that fits with the estimate's undercount allowed for.
    low = largest(free / UNDERCOUNT) or min(1, largest(free))
    if low:
        accum = -(-batch_size * cfg.training.grad_accum // low)
        hint = (f"Lower training.batch_size to {low} or less (or lower data.seq_len); set "
                f"training.grad_accum to {accum} to keep the effective batch of "
                f"{batch_size * cfg.training.grad_accum} blocks a step. Or close other programs.")
    else:
        hint = ("Even one block does not fit: lower data.seq_len, turn gradient checkpointing on, "
                + ("load the base in 4bit, " if _is_cuda(device) else "")
                + "pick a smaller model, or close other programs.")
    raise ConfigError({"training.batch_size": problem}, hint=hint)


def available_memory(device) -> int | None:
    """Bytes a training step can still use on `device`; None where that cannot be read.

    CUDA: the driver's free memory plus what torch's allocator holds unused. CPU: the RAM the
    system reports available, or less where a container's cgroup limit leaves less.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(free + cached)
        except Exception:  # a broken driver must not stop a run the check cannot judge
            return None
    if device.type != "cpu":
        return None
    import psutil

    memory = psutil.virtual_memory()
    limited = _cgroup_available(memory.total)
    return int(memory.available if limited is None else min(memory.available, limited))


_CGROUP_FILES = (   # (limit, usage, stat, reclaimable page cache key): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
     "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)


def _cgroup_available(total_ram: int) -> int | None:
    """RAM left under this container's memory limit (page cache it can drop counted free)."""
    for limit_file, usage_file, stat_file, cache_key in _CGROUP_FILES:
        try:
            with open(limit_file) as fh:
                limit_text = fh.read().strip()
            if limit_text == "max":
                return None
            limit = int(limit_text)
            if limit >= total_ram:
                return None           # no limit below the machine's RAM
            with open(usage_file) as fh:
                usage = int(fh.read().strip())
            with open(stat_file) as fh:
                stats = dict(line.split() for line in fh if line.count(" ") == 1)
            return max(0, limit - usage + int(stats.get(cache_key, 0)))
        except (OSError, ValueError):
            continue
    return None


def _is_cuda(device) -> bool:
    import torch

    return torch.device(device).type == "cuda"
