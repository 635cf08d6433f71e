"""Typed, versioned events: the only language between the trainer, the run store, the CLI and the GUI.

Each event is a frozen dataclass that round-trips through one JSON line:

    line = to_json(StepMetrics(step=3, loss=2.1, ...))
    event = from_json(line)          # raises EventError on an unknown type or field

The worker prints them on stdout (`--events jsonl`) and appends them to runs/<id>/events.jsonl.
Every event carries `pid`, the process that made it (the worker; the GUI for a failure it records
on behalf of a worker that died silently); events of logs written before pids were recorded read
back with pid 0, "unknown".
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

EVENTS_VERSION = 1

PHASES = ("loading_model", "tokenizing", "training", "evaluating", "saving", "exporting")


class EventError(ValueError):
    """A line is not a valid event of this schema version."""


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class Event:
    time: float = field(default_factory=_now, kw_only=True)
    pid: int = field(default_factory=os.getpid, kw_only=True)   # the process that made the event


@dataclass(frozen=True)
class RunStarted(Event):
    run_id: str
    name: str
    config: dict
    model: str = ""
    device: str = ""
    total_steps: int = 0
    param_groups: dict = field(default_factory=dict)  # group name -> {"lr":..., "params": n, "tensors": k}
    trainable_params: int = 0
    total_params: int = 0
    resumed_from_step: int = 0
    kernels: bool = False
    # The run's Plan (engine/train/plan.py, Plan.to_dict()): every decision its `auto` settings
    # led to, each with its reason, and `lines`, their human-readable form. {} in older runs.
    plan: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Phase(Event):
    phase: str                 # one of PHASES
    progress: float = 0.0      # 0..1, or -1 when unknown
    message: str = ""


@dataclass(frozen=True)
class StepMetrics(Event):
    step: int
    epoch: float
    loss: float
    lr: float
    embedding_lr: float
    grad_norm: float
    tokens_seen: int
    tokens_per_s: float
    step_s: float
    gpu_mem_allocated: Optional[float] = None   # bytes
    gpu_mem_reserved: Optional[float] = None    # bytes
    gpu_mem_total: Optional[float] = None       # bytes
    gpu_util: Optional[float] = None            # percent
    ram: Optional[float] = None                 # bytes used by the worker process
    eta_s: Optional[float] = None


@dataclass(frozen=True)
class EvalMetrics(Event):
    step: int
    eval_set: str              # "heldout", "retention", or a file name
    eval_loss: float
    perplexity: float


@dataclass(frozen=True)
class Sample(Event):
    step: int
    prompt: str
    text: str


@dataclass(frozen=True)
class CheckpointSaved(Event):
    step: int
    path: str
    kind: str = "checkpoint"   # "checkpoint" or "adapter" (the final export)


@dataclass(frozen=True)
class Log(Event):
    level: str                 # "debug" | "info" | "warning" | "error"
    message: str


@dataclass(frozen=True)
class RunFinished(Event):
    step: int
    final_loss: Optional[float] = None
    adapter_path: str = ""
    stopped_early: bool = False


@dataclass(frozen=True)
class RunFailed(Event):
    kind: str                  # "config" | "corpus" | "model" | "oom" | "crash" | ...
    message: str
    hint: str = ""
    step: int = 0


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (RunStarted, Phase, StepMetrics, EvalMetrics, Sample, CheckpointSaved, Log,
                RunFinished, RunFailed)
}


def to_dict(event: Event) -> dict:
    return {"type": type(event).__name__, "v": EVENTS_VERSION, **dataclasses.asdict(event)}


def to_json(event: Event) -> str:
    return json.dumps(to_dict(event), ensure_ascii=False, allow_nan=True, separators=(",", ":"))


def from_dict(data: dict) -> Event:
    if not isinstance(data, dict):
        raise EventError(f"event must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("type", None)
    version = data.pop("v", None)
    if kind not in EVENT_TYPES:
        raise EventError(f"unknown event type {kind!r}")
    if version != EVENTS_VERSION:
        raise EventError(f"event version {version!r} is not {EVENTS_VERSION}")
    cls = EVENT_TYPES[kind]
    data.setdefault("pid", 0)      # a line written before events carried pids: the writer is unknown
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise EventError(f"{kind} has no field(s) {', '.join(unknown)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise EventError(f"{kind}: {exc}") from None


def from_json(line: str) -> Event:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EventError(f"not JSON: {exc}") from None
    return from_dict(data)
