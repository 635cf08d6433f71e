"""Unsloth side of P1/P2: the same workload through Unsloth's own API (issue 12).

    python bench/unsloth_train.py --model DIR --shape p1 --steps 12 --warmup 3 [--json-out F]
    python bench/unsloth_train.py --model DIR --shape tiny --no-quant   # CPU: its CPU backend

FastLanguageModel.from_pretrained(load_in_4bit: NF4 + double quant with bf16 compute, as the
baseline's), then get_peft_model(r 16, the baseline's alpha and dropout, target_modules = the 7
projections + "embed_tokens" + "lm_head" (Unsloth moves those two to modules_to_save: trained in
full), use_gradient_checkpointing="unsloth" (its offloaded checkpoints), random_state = --seed).
The optimizer is built here the way baseline_train.py builds it: torch AdamW, no weight decay, two
groups, embed_tokens' and lm_head's trainable copies at common.EMBEDDING_LR and the rest at
common.LR. (UnslothTrainer's embedding_learning_rate makes the same two groups: a trainable
parameter named "...modules_to_save.default.weight" goes to the embedding group.) bf16 autocast
on CUDA, as HF Trainer's bf16=True and Unsloth's own training loop; clip 1.0, the batches and the
timed loop are common.py's. Prints one JSON result line (common.run_steps) with Unsloth's versions.

Unsloth patches transformers, peft and trl when it is imported, so it is imported here before any
of them (common.py imports only torch). If it cannot be imported (not installed; the GPU path
without a GPU), the result says status "failed" with the error, and the exit code is 1. It runs
offline (HF_HUB_OFFLINE=1) and keeps its compile cache and offloaded embeddings under /tmp, not in
the working directory.

Device: bench/device_vs_unsloth.sh (the wheels of bench/unsloth_wheels.sh, carried as .whl_unsloth).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SIDE = "unsloth"
# Unsloth's names: the two embedding matrices trained in full, moved to modules_to_save.
EMBEDDINGS = ["embed_tokens", "lm_head"]
SCRATCH = Path(os.environ.get("CPT_BENCH_UNSLOTH_TMP")
               or Path(tempfile.gettempdir()) / "cpt_bench_unsloth")


def import_unsloth():
    """Import unsloth before transformers/peft/trl (it patches them); the module, or raises."""
    patched = [m for m in ("transformers", "peft", "trl") if m in sys.modules]
    if patched:
        raise RuntimeError(f"{patched} imported before unsloth: it could not patch them")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(SCRATCH / "compiled_cache"))
    SCRATCH.mkdir(parents=True, exist_ok=True)
    import unsloth  # noqa: F401  (the patches)

    return unsloth


def unsloth_versions(unsloth=None) -> dict:
    """unsloth / unsloth_zoo versions (from the packages' metadata when the import failed)."""
    from importlib import metadata

    out = {}
    for name in ("unsloth", "unsloth_zoo"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    if unsloth is not None:
        out["unsloth"] = getattr(unsloth, "__version__", out["unsloth"])
        # Unsloth picks a CPU backend (stock transformers + peft) when it finds no accelerator.
        out["unsloth_backend"] = "cpu" if getattr(unsloth, "_IS_CPU_BACKEND", False) else "gpu"
    return out


def load(args, device: torch.device, seq: int):
    from unsloth import FastLanguageModel

    cuda = device.type == "cuda"
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model, max_seq_length=seq,
        dtype=torch.bfloat16 if cuda else torch.float32,
        load_in_4bit=not args.no_quant, use_gradient_checkpointing="unsloth",
        fix_tokenizer=False)   # build_model.py's stand-in tokenizer: leave it (and the vocab) be
    return model


def prepare(model, args, seq: int):
    from unsloth import FastLanguageModel

    model = FastLanguageModel.get_peft_model(
        model, r=common.LORA_R, lora_alpha=common.LORA_ALPHA, lora_dropout=0.0, bias="none",
        target_modules=list(common.TARGET_MODULES) + EMBEDDINGS,
        use_gradient_checkpointing="unsloth", random_state=args.seed, max_seq_length=seq,
        temporary_location=str(SCRATCH / "offloaded"))
    for_training = getattr(FastLanguageModel, "for_training", None)
    if for_training is not None:
        for_training(model)
    return model


def is_embedding(name: str) -> bool:
    """The baseline's rule (embed_tokens / lm_head in the name), which also covers Unsloth's
    ("...modules_to_save.default.weight")."""
    return any(e in name for e in EMBEDDINGS) or name.endswith("modules_to_save.default.weight")


def param_groups(named_parameters) -> list[dict]:
    """[{params, lr}] for AdamW: the rest at LR, the embedding matrices at EMBEDDING_LR."""
    embed, other = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (embed if is_embedding(name) else other).append(p)
    if not embed or not other:
        raise RuntimeError(f"expected LoRA and embedding parameters to train, got {len(other)} "
                           f"and {len(embed)}")
    return [{"params": other, "lr": common.LR}, {"params": embed, "lr": common.EMBEDDING_LR}]


def optimizer_for(model):
    return torch.optim.AdamW(param_groups(model.named_parameters()), weight_decay=0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    batch, seq = common.resolve_sizes(args)
    result = {"side": SIDE, "shape": args.shape, "batch": batch, "seq": seq,
              "steps": args.steps, "warmup": args.warmup, "quant": not args.no_quant,
              "status": "ok"}
    try:
        unsloth = import_unsloth()
    except Exception as exc:   # not installed, or no usable backend: a result that says so
        traceback.print_exc()
        result.update(status="failed", error=f"unsloth import: {type(exc).__name__}: "
                      + (str(exc).splitlines() or [""])[0][:300],
                      versions={**common.versions(), **unsloth_versions()})
        common.finish(result, args.json_out)
        return 1
    result["versions"] = {**common.versions(), **unsloth_versions(unsloth)}
    try:
        device = common.pick_device(args.mem_cap_gib)
        if device.type == "cuda" and result["versions"].get("unsloth_backend") == "cpu":
            raise RuntimeError("unsloth chose its CPU backend on a CUDA machine")
        t0 = time.time()
        model = prepare(load(args, device, seq), args, seq)
        result["load_s"] = time.time() - t0
        result["trainable"] = common.trainable_summary(model)
        optimizer = optimizer_for(model)
        result["param_groups"] = [{"lr": g["lr"], "tensors": len(g["params"]),
                                   "elements": sum(p.numel() for p in g["params"])}
                                  for g in optimizer.param_groups]
        common.train_hf_side("unsloth", model, optimizer, args, batch, seq, device, result)
    except Exception as exc:   # OOM is an answer (--probe-seq); anything else fails the run
        if not common.is_oom(exc):
            traceback.print_exc()
            first_line = (str(exc).splitlines() or [""])[0][:300]
            result.update(status="failed", error=f"{type(exc).__name__}: {first_line}")
            common.finish(result, args.json_out)
            return 1
        result.update(status="oom", error=str(exc).splitlines()[0][:300])
    common.finish(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
