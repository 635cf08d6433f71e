"""Pieces shared by the P1/P2 bench scripts: shapes, seeded batches, the timed loop, result JSON.

Used by build_model.py, baseline_train.py, engine_train.py and compare.py (GOALS.md "Speed and
memory"). Imports nothing from cpt_studio, so the baseline stays plain transformers + peft.
"""
from __future__ import annotations

import gc
import hashlib
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}

# name -> architecture (LlamaConfig kwargs), micro-batch and sequence length of the protocol.
SHAPES = {
    # P1: Llama-3.1-8B shape, ~8.0B params (1.05B of them in the untied embed_tokens + lm_head).
    "p1": {"config": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336,
                      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                      "head_dim": 128, "vocab_size": 128256, "rope_scaling": dict(_LLAMA3_ROPE)},
           "batch": 2, "seq": 2048},
    # P2: Llama-3.2-1B shape, untied (~1.5B params with the separate lm_head).
    "p2": {"config": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192,
                      "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                      "head_dim": 64, "vocab_size": 128256,
                      "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}},
           "batch": 4, "seq": 2048},
    # tiny: for checking the scripts on a CPU in seconds.
    "tiny": {"config": {**_LLAMA, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "head_dim": 16, "vocab_size": 1000, "max_position_embeddings": 8192,
                        "rope_scaling": {**_LLAMA3_ROPE, "original_max_position_embeddings": 1024}},
             "batch": 2, "seq": 64},
}

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 16, 32
LR, EMBEDDING_LR = 5e-5, 5e-6
MAX_GRAD_NORM = 1.0   # both sides clip, as HF Trainer and our trainer do by default
SEED = 1234


def add_common_args(parser) -> None:
    """The arguments both training scripts take (compare.py passes the same to each)."""
    parser.add_argument("--model", required=True, help="model folder from build_model.py")
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--batch", type=int, default=0, help="micro-batch (0 = the shape's)")
    parser.add_argument("--seq", type=int, default=0, help="sequence length (0 = the shape's)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps in all")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--no-quant", action="store_true", help="bf16 (CUDA) / fp32 (CPU) base, no bnb")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--mem-cap-gib", type=float, default=0.0,
                        help="cap this process's CUDA allocator (e.g. 79 to act like an H100 80GB)")
    parser.add_argument("--json-out", default="", help="also write the result JSON here")


def resolve_sizes(args) -> tuple[int, int]:
    shape = SHAPES[args.shape]
    return args.batch or shape["batch"], args.seq or shape["seq"]


def pick_device(mem_cap_gib: float = 0.0) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if mem_cap_gib > 0:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, mem_cap_gib * 2**30 / total))
    return torch.device("cuda")


def make_batches(vocab: int, batch: int, seq: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq) int64 token ids from one seeded CPU generator: identical on both sides."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (steps, batch, seq), generator=gen, dtype=torch.int64)


def batches_digest(batches: torch.Tensor) -> str:
    return hashlib.sha256(batches.numpy().tobytes()).hexdigest()[:16]


def trainable_summary(model) -> dict:
    """{dtype: element count} of the trainable parameters (shared tensors once)."""
    out: dict[str, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            key = str(p.dtype).replace("torch.", "")
            out[key] = out.get(key, 0) + p.numel()
    return out


def train_hf_side(side: str, model, optimizer, args, batch: int, seq: int, device: torch.device,
                  result: dict) -> None:
    """The baseline's and Unsloth's steps: the model's own loss under bf16 autocast on CUDA, on the
    seeded batches (their digest recorded), timed by run_steps; fills `result`."""
    autocast = device.type == "cuda"

    def loss_fn(input_ids):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=input_ids, labels=input_ids).loss

    vocab = model.get_input_embeddings().num_embeddings
    batches = make_batches(vocab, batch, seq, args.steps, args.seed)
    result["batches_sha256"] = batches_digest(batches)
    log(f"{side}: loaded in {result['load_s']:.1f}s, training {args.steps} steps of {batch}x{seq}")
    result.update(run_steps(loss_fn, optimizer, model, batches, args.warmup, device))


def run_steps(loss_fn, optimizer, model, batches: torch.Tensor, warmup: int,
              device: torch.device, clip=None) -> dict:
    """Train on each batch (forward+backward, clip, AdamW step); time each step on the host clock.

    `clip(params, max_norm)` defaults to torch's clip_grad_norm_; the engine passes its own, which
    also takes the row-sparse embed_tokens gradient.

    The peak-memory counters are reset just before the first step (after loading), so they hold
    the training peak: weights + adapters + optimizer states + activations.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = clip or torch.nn.utils.clip_grad_norm_
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gib = 2**30
    # Resident before step 1 (weights, adapters) and after step 1 (+ optimizer states; grads are
    # freed by zero_grad(set_to_none=True)): what the peak adds on top is activations + grads.
    mem = {"allocated_before_step1_gib": torch.cuda.memory_allocated() / gib if cuda else None,
           "allocated_after_step1_gib": None}
    model.train()
    losses, times = [], []
    for batch in batches:
        t0 = time.perf_counter()
        loss = loss_fn(batch.to(device, non_blocking=True))
        loss.backward()
        clip(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))    # a device sync
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if cuda and len(times) == 1:
            mem["allocated_after_step1_gib"] = torch.cuda.memory_allocated() / gib
    timed = times[warmup:] or times
    tokens = batches.shape[1] * batches.shape[2]
    return {**mem,
        "losses": losses, "step_times_s": times,
        "mean_loss_timed": sum(losses[warmup:] or losses) / len(losses[warmup:] or losses),
        "tokens_per_s": tokens * len(timed) / sum(timed),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / gib if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib if cuda else None,
    }


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            out[name] = __import__(name).__version__
        except Exception:   # not installed, or a broken install: the table says so
            out[name] = "-"
    out["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def finish(result: dict, json_out: str) -> None:
    """Print the result as one JSON line on stdout (and write it to json_out)."""
    result["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = json.dumps(result)
    if json_out:
        Path(json_out).write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
