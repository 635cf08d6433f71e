"""A stand-in for `python -m cpt_studio.engine.cli train ... --events jsonl` in GUI tests.

    python fake_worker.py EVENTS.jsonl [--delay S] [--stop-after K] [--exit-code N] [--stderr TEXT]
                          [--garbage] [--hold] [--flood N [--rate EVENTS_PER_S]]

Replays the recorded events on stdout (one JSON line each), reads commands from stdin: stop_and_save
prints CheckpointSaved + RunFinished(stopped_early=True) and exits, stop prints RunFinished
(stopped_early=True) and exits, save_now prints a CheckpointSaved and goes on.
"""
import argparse
import dataclasses
import os
import sys
import threading
import time

from cpt_studio.engine.runs.events import (CheckpointSaved, RunFailed, RunFinished, RunStarted,
                                      StepMetrics, from_json, to_json)

_lock = threading.Lock()
_step = 0


def emit(line: str) -> None:
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def finish(code: int = 0) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def listen() -> None:
    for raw in sys.stdin:
        cmd = raw.strip()
        if cmd == "save_now":
            emit(to_json(CheckpointSaved(step=_step, path=f"checkpoints/step-{_step}")))
        elif cmd in ("stop", "stop_and_save"):
            if cmd == "stop_and_save":
                emit(to_json(CheckpointSaved(step=_step, path=f"checkpoints/step-{_step}")))
                emit(to_json(CheckpointSaved(step=_step, path="adapter", kind="adapter")))
            emit(to_json(RunFinished(step=_step, stopped_early=True)))
            finish(0)


def flood(n: int, rate: float = 0.0) -> None:
    """n StepMetrics as fast as possible, or at `rate` events/s in bursts every 10 ms."""
    emit(to_json(RunStarted(run_id="flood", name="flood", config={}, total_steps=n, pid=os.getpid())))
    burst = max(1, int(rate / 100)) if rate else n
    start = time.monotonic()
    for step in range(1, n + 1):
        emit(to_json(StepMetrics(step=step, epoch=0.0, loss=2.0 + 1.0 / step, lr=1e-4, embedding_lr=1e-5,
                                 grad_norm=1.0, tokens_seen=step * 512, tokens_per_s=1e5, step_s=0.001)))
        if rate and step % burst == 0:
            time.sleep(max(0.0, start + step / rate - time.monotonic()))
    emit(to_json(RunFinished(step=n, final_loss=2.0)))


def main() -> None:
    global _step
    ap = argparse.ArgumentParser()
    ap.add_argument("events", nargs="?")
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--stop-after", type=int, default=None, help="print K events, then exit")
    ap.add_argument("--exit-code", type=int, default=0)
    ap.add_argument("--stderr", default="")
    ap.add_argument("--garbage", action="store_true", help="print a line that is not an event")
    ap.add_argument("--hold", action="store_true", help="leave out the end and wait for a command")
    ap.add_argument("--flood", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0, help="events per second for --flood (0 = no limit)")
    args = ap.parse_args()
    threading.Thread(target=listen, daemon=True).start()
    if args.garbage:
        emit("this line is not an event")
    if args.flood:
        flood(args.flood, args.rate)
    lines = [l for l in open(args.events, encoding="utf-8").read().splitlines() if l.strip()] if args.events else []
    for i, line in enumerate(lines):
        if args.stop_after is not None and i >= args.stop_after:
            break
        event = from_json(line)
        if args.hold and isinstance(event, (RunFinished, RunFailed)):
            continue
        _step = getattr(event, "step", _step)
        if isinstance(event, RunStarted):    # a live worker reports its own pid
            line = to_json(dataclasses.replace(event, pid=os.getpid(), time=time.time()))
        emit(line)
        if args.delay:
            time.sleep(args.delay)
    if args.hold:
        time.sleep(30)
    if args.stderr:
        sys.stderr.write(args.stderr + "\n")
    finish(args.exit_code)


if __name__ == "__main__":
    main()
