"""The one training loop, shared by the CLI, the GUI's worker and torchrun.

    result = run_training(config, workspace, run_dir, sink, control, resume=False)
    result = run_training(config, workspace, run_dir, sink, control, resume=True,
                          checkpoint="step-40")             # a given checkpoint, else the newest intact

Every step emits StepMetrics; evals, samples and checkpoints happen on their intervals; the control
channel can stop, stop-and-save or save-now between steps. Errors become a RunFailed event with a
hint and an exit code (2 = bad input or a full disk, 1 = crash or out of memory); the checkpoints
already written stay. A resume chooses its checkpoint (by content, `choose_checkpoint`) before
loading anything.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import torch

from ..atomic import publish_dir_atomic, write_text_atomic
from ..runs.checkpoints import (CheckpointChoice, choose_checkpoint, list_checkpoints, load_checkpoint,
                                resume_advice, save_checkpoint)
from ..runs.control import ControlChannel, StopNow
from ..errors import CptError, exception_text, write_error
from ..model.adapters import EMBEDDINGS_GROUP, LORA_GROUP
from .evaluation import evaluate_blocks, generate_samples
from ..runs.events import (CheckpointSaved, EvalMetrics, Log, Phase, RunFailed, RunFinished, RunStarted,
                     Sample, StepMetrics)
from .grad_clip import clip_grad_norm
from .system_metrics import SystemMonitor
from .setup import TRAINER_STATE_FILE, TrainingSetup, setup_training

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    status: str                 # "finished" | "stopped" | "failed"
    step: int
    final_loss: Optional[float]
    adapter_path: str
    exit_code: int


def run_training(config, workspace, run_dir, sink, control: Optional[ControlChannel] = None,
                 resume: bool = False, checkpoint: str | None = None) -> TrainResult:
    """Train one run to its end (or a stop command); never raises for a user-facing failure.

    resume: go on from a checkpoint of `run_dir`: `checkpoint` ("step-N") or, when None, the newest
    intact one (damaged newer ones are passed over with a warning).
    """
    control = control or ControlChannel()
    step = 0
    loop = TrainingLoop(config, workspace, run_dir, sink, control)
    try:
        return loop.run(resume, checkpoint)
    except StopNow as exc:   # a second stop signal, or one before training began: no save
        step = loop.stopped_at(resume)
        _report_end(sink, Log(level="warning", message=f"{exc.name}: stopped at once at step {step}, "
                              "without saving; the checkpoints written before are kept."))
        _report_end(sink, RunFinished(step=step, final_loss=loop.last_loss, stopped_early=True))
        return TrainResult("stopped", step, loop.last_loss, "", exc.exit_code)
    except CptError as exc:
        step = getattr(exc, "step", 0)
        _report_end(sink, RunFailed(kind=exc.kind, message=exc.message, hint=exc.hint, step=step))
        return TrainResult("failed", step, None, "", 2)
    except torch.OutOfMemoryError as exc:
        _report_end(sink, RunFailed(kind="oom", message=f"Out of GPU memory: {str(exc).splitlines()[0]}",
                                    hint="Lower batch_size or seq_len, turn on gradient checkpointing, or "
                                         "load the base in 4bit. Checkpoints written so far are kept."))
        return TrainResult("failed", step, None, "", 1)
    except Exception as exc:  # a crash: report it, keep the checkpoints, let the caller exit 1
        log.error("training crashed:\n%s", traceback.format_exc())
        _report_end(sink, RunFailed(kind="crash", message=exception_text(exc),
                                    hint=f"See the log for the traceback; once the cause is fixed, "
                                         f"{_advice(run_dir)}."))
        return TrainResult("failed", step, None, "", 1)


def _report_end(sink, event) -> None:
    """Emit the run's last events; a sink that cannot take them (a full disk under the run
    folder) is logged, and the others still got them (FanOut)."""
    try:
        sink.emit(event)
    except CptError as exc:
        log.warning("could not record %s: %s", type(event).__name__, exc.message)


def _advice(run_dir) -> str:
    try:
        return resume_advice(run_dir)
    except OSError:             # the run folder itself is unreadable
        return "resume the run"


def first_step_note(kernel_summary: list, device: torch.device) -> str:
    """What the Run page says during this process's first training step, or "".

    With the kernels on a GPU, Triton compiles each kernel at its first launch: the backward's
    at the first training step (the evaluation before it compiles the forward's). On an H200 that
    took 34 s of a 1B-shape run on a fresh machine (bench/RESULTS.md, H200, 2026-11-28); Triton
    keeps them in its cache, so later runs start at once."""
    if not kernel_summary or torch.device(device).type != "cuda":
        return ""
    return "first step: compiling GPU kernels (up to a minute on a new machine)"


class TrainingLoop:
    def __init__(self, config, workspace, run_dir, sink, control: ControlChannel):
        self.cfg = config
        self.workspace = workspace
        self.run_dir = run_dir
        self.sink = sink
        self.control = control
        self.s: Optional[TrainingSetup] = None
        self.choice: Optional[CheckpointChoice] = None    # a resume's checkpoint
        self.step = 0
        self.tokens_seen = 0
        self.last_loss: Optional[float] = None

    # ---- the run ---------------------------------------------------------------------------
    def run(self, resume: bool, checkpoint: str | None = None) -> TrainResult:
        if resume:                  # before loading anything: a missing or damaged one fails fast
            self.choice = choose_checkpoint(self.run_dir, checkpoint)
            for note in self.choice.notes():
                self._log(note, "warning")
        s = self.s = setup_training(self.cfg, self.workspace, self.sink.emit)
        self.step = s.base_step
        resumed_from = 0
        if resume:
            resumed_from = self._restore(self.choice)
            self._record_config()
        monitor = SystemMonitor(s.device)
        self.sink.emit(RunStarted(
            run_id=self.run_dir.id, name=self.cfg.name, config=self.cfg.to_dict(),
            model=s.model_name, device=_device_name(s.device), total_steps=s.total_steps,
            param_groups=s.param_groups, trainable_params=s.trainable_params,
            total_params=s.total_params, resumed_from_step=resumed_from,
            kernels=bool(s.kernel_summary), plan=s.plan.to_dict()))
        self._log("plan:\n  " + "\n  ".join(s.plan.lines()))
        self._log(f"parameter groups: {s.param_groups}")
        self._log(f"data: {s.data_stats}")
        if s.kernel_summary:
            self._log("kernels: " + ", ".join(s.kernel_summary))
        if s.memory_summary:
            self._log("memory: " + "; ".join(s.memory_summary))
        if not resumed_from:
            self._evaluate()

        stopped, ev_cfg, ck_cfg = False, self.cfg.eval, self.cfg.checkpoint
        step_ema = None
        last_saved = resumed_from
        note = first_step_note(s.kernel_summary, s.device)
        if note:
            self.sink.emit(Phase(phase="training", progress=-1, message=note))   # busy, length unknown
        self.control.begin_training()      # a stop signal now stops and saves
        while self.step < s.total_steps:
            started = time.perf_counter()
            loss = self._train_step()
            if note:   # the first step is done: the kernels are compiled
                note = ""
                self.sink.emit(Phase(phase="training", progress=self._progress(), message=""))
            step_s = time.perf_counter() - started
            step_ema = step_s if step_ema is None else 0.9 * step_ema + 0.1 * step_s
            self.step += 1
            if self.step % self.cfg.training.log_every_steps == 0 or self.step == s.total_steps:
                self._emit_step(loss, step_s, step_ema, monitor)
            local = self.step - s.base_step
            if ev_cfg.every_steps and local % ev_cfg.every_steps == 0 and self.step < s.total_steps:
                self._evaluate(samples=not ev_cfg.sample_every_steps)
            if ev_cfg.sample_every_steps and local % ev_cfg.sample_every_steps == 0:
                self._samples()
            if ck_cfg.every_steps and local % ck_cfg.every_steps == 0 and self.step < s.total_steps:
                self._checkpoint()
                last_saved = self.step
            command = self.control.poll()
            if command == "save_now" and last_saved != self.step:
                self._checkpoint()
                last_saved = self.step
            elif command in ("stop", "stop_and_save"):
                stopped = True
                if self.control.stop_signal:
                    self._log(f"{self.control.stop_signal}: stopping at step {self.step}; saving a "
                              "checkpoint and the adapter (send it again to stop at once)", "warning")
                if command == "stop":
                    self.sink.emit(RunFinished(step=self.step, final_loss=self.last_loss,
                                               stopped_early=True))
                    return TrainResult("stopped", self.step, self.last_loss, "", 0)
                break

        self.control.end_training()        # the final evaluation and saves run to their end
        if not stopped:
            self._evaluate()
        if last_saved != self.step:
            self._checkpoint()
        adapter = self._export_adapter()
        self.sink.emit(RunFinished(step=self.step, final_loss=self.last_loss,
                                   adapter_path=str(adapter), stopped_early=stopped))
        return TrainResult("stopped" if stopped else "finished", self.step, self.last_loss,
                           str(adapter), 0)

    # ---- one optimizer step ----------------------------------------------------------------
    def _train_step(self) -> torch.Tensor:
        s, t = self.s, self.cfg.training
        s.model.train()
        loss_sum = torch.zeros((), device=s.device)
        for _ in range(t.grad_accum):
            batch = s.train_blocks[s.sampler.next_indices()].to(s.device, non_blocking=True)
            loss = s.loss_fn(batch)
            (loss / t.grad_accum).backward()
            loss_sum += loss.detach().float()
            self.tokens_seen += batch.numel()
        params = [p for g in s.optimizer.param_groups for p in g["params"]]
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        self._grad_norm = clip_grad_norm(params, max_norm)
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        return loss_sum / t.grad_accum

    def _emit_step(self, loss: torch.Tensor, step_s: float, step_ema: float, monitor) -> None:
        s = self.s
        self.last_loss = float(loss)  # the one device sync per logged step
        groups = {g.get("name", str(i)): g["lr"] for i, g in enumerate(s.optimizer.param_groups)}
        tokens = self.cfg.training.grad_accum * s.sampler.batch_size * s.train_blocks.shape[1]
        reading = monitor.read()
        self.sink.emit(StepMetrics(
            step=self.step, epoch=round(s.sampler.epoch_progress, 4), loss=self.last_loss,
            lr=float(groups.get(LORA_GROUP, next(iter(groups.values())))),
            embedding_lr=float(groups.get(EMBEDDINGS_GROUP, 0.0)),
            grad_norm=float(self._grad_norm), tokens_seen=self.tokens_seen,
            tokens_per_s=tokens / max(step_s, 1e-9), step_s=step_s,
            gpu_mem_allocated=reading.gpu_mem_allocated, gpu_mem_reserved=reading.gpu_mem_reserved,
            gpu_mem_total=reading.gpu_mem_total, gpu_util=reading.gpu_util, ram=reading.ram,
            eta_s=(s.total_steps - self.step) * step_ema))

    # ---- eval, samples -----------------------------------------------------------------------
    def _evaluate(self, samples: bool = True) -> None:
        s = self.s
        s.model.eval()
        names = list(s.eval_sets)
        for i, name in enumerate(names):
            self.sink.emit(Phase(phase="evaluating", progress=i / len(names), message=name))
            loss, ppl = evaluate_blocks(s.loss_fn, s.eval_sets[name], self.cfg.training.batch_size,
                                        s.device)
            self.sink.emit(EvalMetrics(step=self.step, eval_set=name, eval_loss=loss, perplexity=ppl))
        if samples:
            self._samples()
        self.sink.emit(Phase(phase="training", progress=self._progress(), message=""))

    def _samples(self) -> None:
        prompts = self.cfg.eval.sample_prompts
        if not prompts:
            return
        s = self.s
        s.model.eval()
        texts = generate_samples(s.model, s.tokenizer, prompts, self.cfg.eval.sample_max_new_tokens,
                                 s.device)
        for prompt, text in zip(prompts, texts):
            self.sink.emit(Sample(step=self.step, prompt=prompt, text=text))

    # ---- checkpoints and the final adapter ---------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "last_loss": self.last_loss,
                "sampler": self.s.sampler.state_dict(), "base_step": self.s.base_step}

    def _checkpoint(self) -> None:
        s = self.s
        self.sink.emit(Phase(phase="saving", progress=-1, message=f"checkpoint at step {self.step}"))
        path = save_checkpoint(self.run_dir, self.step, s.model, s.optimizer, s.scheduler,
                               self._trainer_state(), self.cfg.checkpoint.keep_last)
        self.sink.emit(CheckpointSaved(step=self.step, path=str(path)))
        self.sink.emit(Phase(phase="training", progress=self._progress(), message=""))

    def _export_adapter(self):
        final = self.run_dir.adapter_dir
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self.sink.emit(Phase(phase="saving", progress=-1, message="final adapter"))
        try:
            shutil.rmtree(tmp, ignore_errors=True)   # an earlier process of this pid died here
            self.s.model.save_pretrained(str(tmp))
            write_text_atomic(tmp / TRAINER_STATE_FILE, json.dumps(self._trainer_state(), indent=1))
            publish_dir_atomic(tmp, final)
        except BaseException as exc:   # a second stop signal, a full disk: no half adapter left
            error = write_error(exc, "the final adapter", final.parent,
                                lambda: _advice(self.run_dir))   # judged while tmp still fills the disk
            shutil.rmtree(tmp, ignore_errors=True)
            if error is None:
                raise
            raise error from exc
        self.sink.emit(CheckpointSaved(step=self.step, path=str(final), kind="adapter"))
        return final

    def stopped_at(self, resume: bool) -> int:
        """The step the run stands at; stopped while a resume was loading, its checkpoint's."""
        if self.step or not resume:
            return self.step
        return self.choice.step if self.choice is not None else 0

    def _restore(self, choice: CheckpointChoice) -> int:
        if choice.path is None:
            self._log("no complete checkpoint yet: starting this run from the beginning", "warning")
            return 0
        # choose_checkpoint has just checked every file's sha256 (under the run lock).
        state = load_checkpoint(choice.path, self.s.model, self.s.optimizer, self.s.scheduler,
                                verify=False)
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.last_loss = state.get("last_loss")
        self.s.sampler.load_state_dict(state["sampler"])
        self._log(f"resumed from {choice.path.name}")
        later = [p.name for p in list_checkpoints(self.run_dir) if _step(p) > choice.step]
        if choice.explicit and later:
            self._log(f"resuming from {choice.path.name} as asked: the later checkpoints "
                      f"({', '.join(later)}) are deleted when this run saves its next one", "warning")
        return self.step

    def _record_config(self) -> None:
        """A resume's settings (a new max_steps) into config.yaml, once it is sure to train."""
        path = self.run_dir.config_path
        try:
            if self.run_dir.load_config().to_dict() == self.cfg.to_dict():
                return
        except CptError:            # unreadable: written afresh below
            pass
        try:
            self.cfg.save(path)
        except OSError as exc:
            error = write_error(exc, path.name, path.parent, "resume again")
            if error is None:
                raise
            raise error from exc

    # ---- helpers -----------------------------------------------------------------------------
    def _progress(self) -> float:
        s = self.s
        return (self.step - s.base_step) / max(1, s.total_steps - s.base_step)

    def _log(self, message: str, level: str = "info") -> None:
        getattr(log, level)(message)
        self.sink.emit(Log(level=level, message=message))


def _step(checkpoint) -> int:
    return int(checkpoint.name.split("-")[1])


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"
