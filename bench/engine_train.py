"""Our side of P1/P2: the same workload through cpt_studio's engine pieces.

    python bench/engine_train.py --model DIR --shape p1 --steps 12 --warmup 3 [--kernels auto]
    python bench/engine_train.py --model DIR --shape tiny --no-quant         # CPU check

The setup follows engine/train/setup.setup_training step by step (the Plan, load_base_model,
attach_adapters, prepare_model (fp32 masters or bf16 embed/head copies, checkpointing, then the
plan's speed transforms: frozen originals freed, bf16 stream, sparse embed_tokens grad, offloaded
layer inputs, kernels), build_optimizer (fused8bit embedding states on CUDA), make_loss_fn)
with a RunConfig holding the protocol's values; the batches and the timed loop are common.py's,
the same as baseline_train.py's. Prints one JSON result line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def run_config(args, batch: int, seq: int, device: torch.device):
    from cpt_studio.engine.config import AdapterConfig, RunConfig, validate

    cfg = RunConfig(name="bench")
    cfg.model.source = args.model
    cfg.model.precision = "4bit" if not args.no_quant else (
        "bf16" if device.type == "cuda" else "fp32")
    cfg.adapter = AdapterConfig(r=common.LORA_R, alpha=float(common.LORA_ALPHA), dropout=0.0,
                                target_modules=list(common.TARGET_MODULES),
                                embed_tokens="full", lm_head="full")
    cfg.data.seq_len = seq
    t = cfg.training
    t.learning_rate, t.embedding_learning_rate = common.LR, common.EMBEDDING_LR
    t.weight_decay, t.batch_size, t.grad_accum = 0.0, batch, 1
    t.max_steps, t.warmup_steps, t.schedule = args.steps, 0, "constant"
    t.max_grad_norm, t.gradient_checkpointing = common.MAX_GRAD_NORM, True
    t.seed, t.kernels = args.seed, args.kernels
    t.embedding_optimizer = args.embedding_optimizer
    t.embedding_weights = args.embedding_weights
    t.lora_optimizer = args.lora_optimizer
    t.sparse_embedding_grad = not args.dense_embedding_grad
    t.offload_checkpoints = args.offload_checkpoints
    t.defer_head_grad = not args.eager_head_grad
    t.stream_in_compute_dtype = not args.fp32_stream
    t.free_frozen_embeddings = not args.keep_frozen_embeddings
    t.unchecked_layers = args.unchecked_layers
    t.disabled_transforms = ["lora_groups"] if args.ungrouped_lora else []
    problems = validate(cfg)
    if problems:
        raise SystemExit(f"bench RunConfig is invalid: {problems}")
    return cfg


def setup(cfg, device: torch.device):
    """What setup_training does before the data: model, adapters, optimizer, loss function."""
    from cpt_studio.engine.model.adapters import attach_adapters
    from cpt_studio.engine.model.loading import load_base_model
    from cpt_studio.engine.model.source import describe_model, resolve_model_source
    from cpt_studio.engine.train.optim import build_optimizer
    from cpt_studio.engine.train.plan import resolve
    from cpt_studio.engine.train.setup import make_loss_fn, prepare_model

    # models_dir is only written for .gguf sources; a model folder resolves to itself.
    resolved = resolve_model_source(cfg.model.source, Path(cfg.model.source).parent)
    plan = resolve(cfg, device, describe_model(resolved, cfg.model.trust_remote_code))
    model, _tokenizer = load_base_model(resolved, plan.precision, device.type,
                                        cfg.model.trust_remote_code)
    torch.manual_seed(cfg.training.seed)   # LoRA A init: the baseline seeds the same way
    model = attach_adapters(model, cfg.adapter)
    surgery, embeddings = prepare_model(model, plan)
    embeddings["plan"] = plan.to_dict()
    optimizer, groups = build_optimizer(model, cfg, plan)
    loss_fn, kernels = make_loss_fn(model, plan, surgery)
    return model, optimizer, groups, loss_fn, kernels, embeddings


def _sdpa_backend(name: str):
    """torch's SDPA backend for the steps: "auto" leaves torch's choice (cuDNN on an H200 here).
    The backend flags are process-wide, so the backward's recompute on autograd's thread sees them
    too. (P2's py-spy samples put 11% of the main thread in the SDPA call: results 2026-11-28_h200_16h11_pyspy_p2.txt.gz.)"""
    import contextlib

    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel(backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                        help="training.kernels (auto = on with CUDA)")
    parser.add_argument("--embedding-optimizer", choices=("auto", "adamw", "adamw8bit", "fused8bit"),
                        default="auto", help="training.embedding_optimizer")
    parser.add_argument("--embedding-weights", choices=("auto", "fp32", "bf16"), default="auto",
                        help="training.embedding_weights")
    parser.add_argument("--lora-optimizer", choices=("adamw", "fused8bit"), default="adamw",
                        help="training.lora_optimizer")
    parser.add_argument("--dense-embedding-grad", action="store_true",
                        help="training.sparse_embedding_grad off")
    parser.add_argument("--ungrouped-lora", action="store_true",
                        help="training.disabled_transforms = [lora_groups] (q/k/v and gate/up each "
                             "their own fused 4-bit function), to measure the grouping")
    parser.add_argument("--sdpa-backend", choices=("auto", "cudnn", "flash", "efficient", "math"),
                        default="auto", help="bench only: torch's attention backend for the steps")
    parser.add_argument("--eager-head-grad", action="store_true",
                        help="training.defer_head_grad off (lm_head's dW in the loss's forward)")
    parser.add_argument("--offload-checkpoints", choices=("auto", "on", "off"), default="auto",
                        help="training.offload_checkpoints")
    parser.add_argument("--fp32-stream", action="store_true",
                        help="training.stream_in_compute_dtype off")
    parser.add_argument("--keep-frozen-embeddings", action="store_true",
                        help="training.free_frozen_embeddings off")
    parser.add_argument("--unchecked-layers", type=int, default=0,
                        help="training.unchecked_layers (the last N decoder layers not "
                             "checkpointed)")
    args = parser.parse_args()
    batch, seq = common.resolve_sizes(args)
    result = {"side": "engine", "shape": args.shape, "batch": batch, "seq": seq,
              "steps": args.steps, "warmup": args.warmup, "quant": not args.no_quant,
              "versions": common.versions(), "status": "ok"}
    try:
        device = common.pick_device(args.mem_cap_gib)
        cfg = run_config(args, batch, seq, device)
        t0 = time.time()
        model, optimizer, groups, loss_fn, kernels, embeddings = setup(cfg, device)
        result.update(load_s=time.time() - t0, precision=cfg.model.precision,
                      embedding_setup=embeddings, optimizer=(repr(optimizer) if hasattr(optimizer, "parts")
                                                           else type(optimizer).__name__),
                      kernels_mode=args.kernels, kernels=[str(k) for k in kernels],
                      param_groups=groups, trainable=common.trainable_summary(model))
        vocab = model.get_input_embeddings().num_embeddings
        batches = common.make_batches(vocab, batch, seq, args.steps, args.seed)
        result["batches_sha256"] = common.batches_digest(batches)
        common.log(f"engine: loaded in {result['load_s']:.1f}s ({cfg.model.precision}, "
                   f"kernels {args.kernels}: {len(kernels)} applied), training {args.steps} steps "
                   f"of {batch}x{seq}")
        from cpt_studio.engine.train.grad_clip import clip_grad_norm

        with _sdpa_backend(args.sdpa_backend):
            result.update(common.run_steps(loss_fn, optimizer, model, batches, args.warmup, device,
                                           clip=clip_grad_norm))
        result["sdpa_backend"] = args.sdpa_backend
    except Exception as exc:   # OOM is an answer (--probe-seq); anything else fails the run
        if not common.is_oom(exc):
            raise
        result.update(status="oom", error=str(exc).splitlines()[0][:300])
    common.finish(result, args.json_out)


if __name__ == "__main__":
    main()
