"""Human-readable progress for the CLI: one live line with loss, tokens/s and ETA, plus key events."""
from __future__ import annotations

import sys
import time

from .events import (CheckpointSaved, EvalMetrics, Event, Log, Phase, RunFailed, RunFinished,
                     RunStarted, Sample, StepMetrics)
from ..units import format_count, format_duration


class ConsoleProgress:
    """An EventSink that draws a progress bar on a terminal (or plain lines when piped)."""

    def __init__(self, stream=None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total = 0
        self._line_open = False
        self._last_plain = 0.0

    def _print(self, text: str) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def emit(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.total = event.total_steps
            groups = ", ".join(f"{name} lr={g.get('lr', 0):.2e} ({format_count(g.get('params', 0))} "
                               f"params)" for name, g in event.param_groups.items())
            resumed = f", resumed at step {event.resumed_from_step}" if event.resumed_from_step else ""
            self._print(f"Run {event.run_id}: {event.model} on {event.device}, "
                        f"{event.total_steps} steps{resumed}; kernels {'on' if event.kernels else 'off'}")
            self._print(f"  trainable {format_count(event.trainable_params)} of "
                        f"{format_count(event.total_params)} parameters; {groups}")
            for line in event.plan.get("lines", ())[1:]:   # the first line (device) is said above
                self._print(f"  {line}")
        elif isinstance(event, Phase) and event.phase != "training":
            if event.progress in (0.0, 1.0, -1) or not self.tty:
                if event.message:
                    self._print(f"[{event.phase}] {event.message}")
        elif isinstance(event, StepMetrics):
            self._step(event)
        elif isinstance(event, EvalMetrics):
            self._print(f"  eval step {event.step} {event.eval_set}: loss {event.eval_loss:.4f}, "
                        f"perplexity {event.perplexity:.2f}")
        elif isinstance(event, Sample):
            self._print(f"  sample step {event.step}: {event.prompt!r} -> {event.text!r}")
        elif isinstance(event, CheckpointSaved):
            what = "adapter" if event.kind == "adapter" else "checkpoint"
            self._print(f"  saved {what} at step {event.step}: {event.path}")
        elif isinstance(event, Log) and event.level in ("warning", "error"):
            self._print(f"  {event.level}: {event.message}")
        elif isinstance(event, RunFinished):
            how = "stopped" if event.stopped_early else "finished"
            loss = f", final loss {event.final_loss:.4f}" if event.final_loss is not None else ""
            self._print(f"Run {how} at step {event.step}{loss}.")
        elif isinstance(event, RunFailed):
            self._print(f"Run failed ({event.kind}): {event.message}")
            if event.hint:
                self._print(f"Hint: {event.hint}")

    def _step(self, m: StepMetrics) -> None:
        total = max(self.total, m.step, 1)
        done = int(self.width * m.step / total)
        bar = "#" * done + "-" * (self.width - done)
        text = (f"step {m.step}/{total} [{bar}] loss {m.loss:.4f} | "
                f"{format_count(m.tokens_per_s)} tok/s | ETA {format_duration(m.eta_s)}")
        if self.tty:
            self.stream.write("\r" + text)
            self.stream.flush()
            self._line_open = True
        elif time.monotonic() - self._last_plain > 2.0 or m.step == total:
            self._last_plain = time.monotonic()
            self._print(text)

    def close(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.flush()
