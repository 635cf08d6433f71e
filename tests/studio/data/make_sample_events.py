"""Regenerate sample_events.jsonl: a short recorded run (30 steps, eval every 10) for the GUI tests.

    python tests/studio/data/make_sample_events.py
"""
import math
import random
from pathlib import Path

from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.runs.events import (CheckpointSaved, EvalMetrics, Log, Phase, RunFinished,
                                      RunStarted, Sample, StepMetrics, to_json)

STEPS, EVAL_EVERY, GIB = 30, 10, 1024 ** 3


def sample_events() -> list:
    rng = random.Random(0)
    t = 1_700_000_000.0
    cfg = RunConfig(name="sample esperanto")
    cfg.training.max_steps = STEPS
    cfg.eval.sample_prompts = ["La vetero hodiaŭ", "Mi ŝatas"]
    ev = [RunStarted(run_id="20240101-000000-sample", name=cfg.name, config=cfg.to_dict(),
                     model="SmolLM2-135M", device="NVIDIA H200 (cuda:0)", total_steps=STEPS,
                     param_groups={"lora": {"lr": 2e-4, "params": 4_884_480, "tensors": 120},
                                   "embeddings": {"lr": 2e-5, "params": 28_311_552, "tensors": 1}},
                     trainable_params=33_196_032, total_params=167_711_616, kernels=True,
                     pid=4242, time=t),
          Phase(phase="loading_model", progress=-1, message="SmolLM2-135M (bf16)", time=t + 1),
          Phase(phase="tokenizing", progress=1.0, message="6 files, 41,216 tokens", time=t + 2),
          Log(level="info", message="packed 80 blocks of 512 tokens", time=t + 2)]

    def evals(step, tt):
        out = []
        for name, base in (("heldout", 3.4 - 0.9 * step / STEPS), ("retention", 2.6 + 0.1 * step / STEPS)):
            out.append(EvalMetrics(step=step, eval_set=name, eval_loss=round(base, 4),
                                   perplexity=round(math.exp(base), 3), time=tt))
        return out

    ev += [Phase(phase="evaluating", progress=0.0, message="step 0", time=t + 3), *evals(0, t + 3)]
    ev.append(Phase(phase="training", progress=0.0, time=t + 4))
    for step in range(1, STEPS + 1):
        tt = t + 4 + step
        warm = min(1.0, step / 5)
        lr = 2e-4 * warm * (0.5 * (1 + math.cos(math.pi * step / STEPS)) if step > 5 else 1.0)
        loss = 3.5 * math.exp(-step / 25) + 0.9 + rng.uniform(-0.15, 0.15)
        ev.append(StepMetrics(step=step, epoch=step / STEPS, loss=round(loss, 4), lr=lr,
                              embedding_lr=lr / 10, grad_norm=round(2.0 / math.sqrt(step) + 0.2, 4),
                              tokens_seen=step * 2048, tokens_per_s=round(24000 + rng.uniform(-500, 500), 1),
                              step_s=0.085, gpu_mem_allocated=11.2 * GIB + step * 1e6,
                              gpu_mem_reserved=14.0 * GIB, gpu_mem_total=140.0 * GIB, gpu_util=87.0,
                              ram=3.1 * GIB, eta_s=round((STEPS - step) * 0.085, 2), time=tt))
        ev.append(Phase(phase="training", progress=step / STEPS, time=tt))
        if step % EVAL_EVERY == 0:
            ev += [Phase(phase="evaluating", progress=0.0, message=f"step {step}", time=tt), *evals(step, tt)]
            ev += [Sample(step=step, prompt=p, text=f"{p} … teksto post paŝo {step}.", time=tt)
                   for p in cfg.eval.sample_prompts]
            ev.append(CheckpointSaved(step=step, path=f"checkpoints/step-{step}", time=tt))
    last = [e for e in ev if isinstance(e, StepMetrics)][-1]
    ev += [CheckpointSaved(step=STEPS, path="adapter", kind="adapter", time=t + 40),
           RunFinished(step=STEPS, final_loss=last.loss, adapter_path="adapter", time=t + 40)]
    return ev


if __name__ == "__main__":
    out = Path(__file__).with_name("sample_events.jsonl")
    out.write_text("".join(to_json(e) + "\n" for e in sample_events()), encoding="utf-8")
    print(f"wrote {out}")
