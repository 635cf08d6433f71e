"""Baseline side of P1/P2: plain transformers + peft + bitsandbytes, set up the way a user would.

    python bench/baseline_train.py --model DIR --shape p1 --steps 12 --warmup 3 [--json-out F]
    python bench/baseline_train.py --model DIR --shape tiny --no-quant       # CPU check

4-bit NF4 base with double quantization and bf16 compute; gradient checkpointing (non-reentrant)
and enable_input_require_grads; LoRA r16 on the 7 projections with embed_tokens and lm_head as
peft modules_to_save; AdamW in two groups (5e-5 / 5e-6 for embed_tokens + lm_head); bf16 autocast
on CUDA. Prints one JSON result line (see common.run_steps). No cpt_studio import.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def load(args, device: torch.device):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"dtype": dtype}
    if not args.no_quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if device.type == "cuda":
        kwargs["device_map"] = {"": 0}
    return AutoModelForCausalLM.from_pretrained(args.model, **kwargs)


def prepare(model, args):
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(args.seed)   # LoRA A init: the engine side seeds the same way
    model = get_peft_model(model, LoraConfig(
        r=common.LORA_R, lora_alpha=common.LORA_ALPHA, lora_dropout=0.0,
        target_modules=common.TARGET_MODULES, modules_to_save=["embed_tokens", "lm_head"],
        task_type="CAUSAL_LM"))
    if args.upcast_trainable:   # optional: fp32 copies of trainable bf16 weights, as ours keeps
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return model


def optimizer_for(model):
    embed, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (embed if ("embed_tokens" in name or "lm_head" in name) else other).append(p)
    return torch.optim.AdamW([{"params": other, "lr": common.LR},
                              {"params": embed, "lr": common.EMBEDDING_LR}], weight_decay=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--upcast-trainable", action="store_true",
                        help="keep trainable weights in fp32 (default: as peft leaves them)")
    args = parser.parse_args()
    batch, seq = common.resolve_sizes(args)
    result = {"side": "baseline", "shape": args.shape, "batch": batch, "seq": seq,
              "steps": args.steps, "warmup": args.warmup, "quant": not args.no_quant,
              "versions": common.versions(), "status": "ok"}
    try:
        device = common.pick_device(args.mem_cap_gib)
        t0 = time.time()
        model = prepare(load(args, device), args)
        result["load_s"] = time.time() - t0
        result["trainable"] = common.trainable_summary(model)
        optimizer = optimizer_for(model)
        common.train_hf_side("baseline", model, optimizer, args, batch, seq, device, result)
    except Exception as exc:   # OOM is an answer (--probe-seq); anything else fails the run
        if not common.is_oom(exc):
            raise
        result.update(status="oom", error=str(exc).splitlines()[0][:300])
    common.finish(result, args.json_out)


if __name__ == "__main__":
    main()
