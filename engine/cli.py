"""Headless CPT Studio: the same engine and events as the desktop app.

    cpt-studio train CONFIG.yaml [--workspace DIR] [--set section.field=value ...] [--events jsonl]
    cpt-studio resume RUN [--checkpoint step-N] [--max-steps N] [--workspace DIR] [--events jsonl]
    cpt-studio runs [--json] [--workspace DIR]
    cpt-studio export RUN [--dtype bf16|fp32|fp16] [--out DIR] [--overwrite] [--workspace DIR]
    cpt-studio demo [--max-steps N] [--workspace DIR] [--events jsonl]

By default progress is printed for people (a bar with loss, tokens/s and ETA); `--events jsonl`
prints one JSON event per line instead (the GUI's worker mode) and reads stop / stop_and_save /
save_now commands from stdin. Ctrl-C, SIGTERM and SIGHUP stop and save (a second one stops at
once); a run is written by one process at a time (runs/<id>/.lock), others are refused. `export` merges a run's newest adapter (or
an adapter / checkpoint folder) into its base model and checks the saved model's logits.

`resume` goes on from the newest checkpoint whose files match their manifest's sha256 (damaged
newer ones are passed over, with a warning), or from `--checkpoint step-N`. Until training starts
it writes nothing into the run folder: a resume that fails before (a checkpoint missing or
damaged, the model or corpus gone) leaves the run's status as it was.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import RunConfig, apply_overrides
from .errors import CptError
from .model.export import DTYPES as EXPORT_DTYPES   # stdlib-only at import: --help stays fast
from .runs.control import ControlChannel, StopNow   # stdlib-only too

log = logging.getLogger("cpt_studio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpt-studio", description="Continued pretraining studio "
                                     "(run without arguments to open the desktop app).")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, events=True):
        p.add_argument("--workspace", metavar="DIR", help="Workspace folder (default: "
                       "$CPT_STUDIO_HOME or the user-data folder).")
        if events:
            p.add_argument("--events", choices=("human", "jsonl"), default="human",
                           help="Progress for people (default) or JSON lines for programs.")
        p.add_argument("-v", "--verbose", action="store_true", help="Debug logging on stderr.")

    train = sub.add_parser("train", help="Train from a YAML config.")
    train.add_argument("config", help="Run config (YAML), as saved by the studio.")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="Override a field, e.g. --set training.learning_rate=1e-4 (repeatable).")
    common(train)

    resume = sub.add_parser("resume", help="Resume a run from its newest intact checkpoint.")
    resume.add_argument("run", help="Run id or run folder.")
    resume.add_argument("--checkpoint", metavar="step-N", help="Resume from this checkpoint "
                        "(default: the newest whose files match their checksums).")
    resume.add_argument("--max-steps", type=int, help="Train to this many steps in total "
                        "(extends a finished run).")
    common(resume)

    runs = sub.add_parser("runs", help="List runs with status, steps and final loss.")
    runs.add_argument("--json", action="store_true", help="Machine-readable output.")
    common(runs, events=False)

    export = sub.add_parser("export", help="Merge a run's adapter into its base model and save "
                            "it as one model folder (verified by loading it back).")
    export.add_argument("run", help="Run id, run folder, or an adapter or checkpoint folder.")
    export.add_argument("--dtype", choices=EXPORT_DTYPES, default="bf16",
                        help="Precision of the merged weights (default bf16).")
    export.add_argument("--out", metavar="DIR", help="Output folder (default: "
                        "runs/<id>/exports/merged-<dtype>/).")
    export.add_argument("--overwrite", action="store_true",
                        help="Replace an earlier export in the output folder.")
    common(export, events=False)

    demo = sub.add_parser("demo", help="Train the embedded default: SmolLM2-135M on the sample "
                          "Esperanto corpus.")
    demo.add_argument("--max-steps", type=int, default=30, help="Steps to train (default 30).")
    common(demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The corpus is tokenized in this process before training, by the fast tokenizer's threads
    # (1.5x faster on 2 cores than one thread: bench/results/2026-12-06_03h07_cpu_tokenize.json).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if not args.verbose:
        _quiet_libraries()
    try:
        if args.command == "runs":
            return _cmd_runs(args)
        if args.command == "train":
            config = apply_overrides(RunConfig.load(args.config), args.overrides)
            return _train(config, args, resume_run=None)
        if args.command == "resume":
            return _train(None, args, resume_run=args.run)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "demo":
            from .demo import demo_config
            return _train(demo_config(args.max_steps), args, resume_run=None)
    except CptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StopNow as exc:              # a stop signal before training began: nothing to save
        print(f"{exc}.", file=sys.stderr)
        return exc.exit_code
    return 2


def _quiet_libraries() -> None:
    """Our own progress and events speak for the run; silence the libraries' bars and notices."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning, module="peft")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _workspace(args):
    from .runs.store import Workspace
    return Workspace(args.workspace)


def _train(config, args, resume_run) -> int:
    from .runs.leftovers import remove_leftovers
    from .runs.lock import RunLock
    from .runs.store import take_command

    workspace = _workspace(args)
    run_dir = workspace.get_run(resume_run) if resume_run is not None else _create_run(workspace, config)
    machine = args.events == "jsonl"
    control = ControlChannel(lambda: take_command(run_dir))
    control.catch_signals()             # before the lock: no stop signal can leave it behind
    try:
        try:
            lock = RunLock(run_dir, "train" if resume_run is None else "resume").acquire()
        except CptError as exc:         # RunBusy: another process writes this run
            if machine:                 # the studio reads stdout; the run's own events stay untouched
                from .runs.events import RunFailed
                from .runs.sinks import JsonLinesSink
                JsonLinesSink(sys.stdout).emit(RunFailed(kind=exc.kind, message=exc.message,
                                                         hint=exc.hint))
            raise
        with lock:
            remove_leftovers(run_dir)   # what killed writers left (never a live process's)
            result = _train_locked(config, args, workspace, run_dir, control, resume_run)
    finally:
        control.restore_signals()
    if not machine and result.adapter_path:
        print(f"Adapter: {result.adapter_path}")
        print(f"Run folder: {run_dir.path}")
    _refresh_index(workspace)
    return result.exit_code


def _create_run(workspace, config):
    from .errors import write_error

    try:
        return workspace.create_run(config)
    except OSError as exc:      # config.yaml on a full disk
        error = write_error(exc, "a new run folder", workspace.runs_dir, "start the run again")
        if error is None:
            raise
        raise error from exc


def _train_locked(config, args, workspace, run_dir, control, resume_run):
    from .runs.sinks import FanOut, JsonLinesSink, RunFolderSink, UntilStarted
    from .train.loop import run_training

    resume = resume_run is not None
    if resume:
        config = run_dir.load_config()
        if args.max_steps is not None:
            config.training.max_steps = args.max_steps   # config.yaml follows once training starts
    machine = args.events == "jsonl"
    if machine:
        front = JsonLinesSink(sys.stdout)
    else:
        from .runs.console_progress import ConsoleProgress
        front = ConsoleProgress(sys.stdout)
    folder = RunFolderSink(run_dir)
    sink = FanOut(UntilStarted(folder) if resume else folder, front)
    if machine and not sys.stdin.isatty():
        control.listen_stdin()
    try:
        return run_training(config, workspace, run_dir, sink, control, resume=resume,
                            checkpoint=getattr(args, "checkpoint", None))
    finally:
        sink.close()


def _refresh_index(workspace) -> None:
    try:
        from .runs.index import RunIndex
        RunIndex(workspace).refresh()
    except Exception as exc:  # the index is a cache; the run folders stay the truth
        log.warning("could not refresh the run index: %s", exc)


def _cmd_export(args) -> int:
    from pathlib import Path

    from .model.export import export_merged

    last = [""]

    def progress(fraction: float, message: str = "") -> None:
        if message and message != last[0]:
            last[0] = message
            print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    result = export_merged(args.run, Path(args.out) if args.out else None, _workspace(args),
                           dtype=args.dtype, progress=progress, overwrite=args.overwrite)
    print(f"Merged model: {result.path}")
    print(f"{result.dtype}, {result.n_params:,} parameters, {result.seconds:.1f} s; "
          f"{result.summary()}")
    return 0


def _cmd_runs(args) -> int:
    from .runs.index import RunIndex

    index = RunIndex(_workspace(args))
    index.refresh()
    rows = index.list_runs()
    if args.json:
        import dataclasses
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1, default=str))
        return 0
    if not rows:
        print("No runs yet. Start one with `cpt-studio demo` or `cpt-studio train CONFIG.yaml`.")
        return 0
    header = f"{'RUN':<36} {'STATUS':<11} {'STEPS':>6} {'LOSS':>8} {'EVAL':>8}  NAME"
    print(header)
    for r in rows:
        loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "-"
        ev = f"{r.eval_loss:.4f}" if r.eval_loss is not None else "-"
        print(f"{r.id:<36} {r.status:<11} {r.steps:>6} {loss:>8} {ev:>8}  {r.name}")
    for r in rows:
        if r.skipped_lines:
            print(f"note: {r.id}: {r.skipped_lines} damaged line(s) in its events.jsonl were skipped; "
                  "its status and steps come from the others.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
