"""Atomic, verifiable training checkpoints: `runs/<id>/checkpoints/step-<N>/`.

    path = save_checkpoint(run, step, model, optimizer, scheduler, {"step": step, ...}, keep_last=3)
    path = latest_checkpoint(run)                        # newest whose file sizes match, or None
    choice = choose_checkpoint(run)                      # what resume takes: checked by content
    choice = choose_checkpoint(run, "step-40")           # an explicit one (resume --checkpoint)
    state = load_checkpoint(choice.path, model, optimizer, scheduler)   # -> trainer_state dict

A checkpoint is written into `checkpoints/.step-<N>.tmp-<pid>-<random>/` and renamed into place once
complete, so a `step-<N>` folder exists only when every file and the manifest (sha256 + size of
each file) were written. A write that fails (a full disk included) removes its temp folder and
raises a CptError naming the folder; the earlier checkpoints stay as they were. Weights go
through safetensors and `torch.load(weights_only=True)` only.

Resume chooses by content: `choose_checkpoint` checks every file's sha256 against the manifest,
newest first, and passes over damaged ones with the reason (`CheckpointChoice.notes`).
`latest_checkpoint` compares sizes only: quick enough for listings (the studio's model picker).
"""
from __future__ import annotations

import enum
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..atomic import file_sha256, publish_dir_atomic, restore_replaced_dir, write_text_atomic
from ..errors import CheckpointError, exception_text, write_error
from .store import RunDir, process_alive

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_STEP_RE = re.compile(r"^step-(\d+)$")
# Hidden work folders: .step-N.tmp-<pid>-<rand>, .step-N.deleting-<pid>, .step-N.old
_HIDDEN_RE = re.compile(r"^\.step-(\d+)\.(?:(?:tmp|deleting)-(\d+)(?:-\w+)?|old)$")


def save_checkpoint(run: RunDir, step: int, model, optimizer, scheduler, trainer_state: dict,
                    keep_last: int, save_embedding_layers: bool | str = "auto") -> Path:
    """Write checkpoint `step-<step>` atomically, then delete old ones beyond `keep_last`."""
    root = run.checkpoints_dir
    final = root / f"step-{step}"
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        clean_temp_folders(root, writer=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.tmp-{os.getpid()}-", dir=root))
        # save_embedding_layers="auto" makes peft also save resized base embeddings.
        model.save_pretrained(str(tmp), save_embedding_layers=save_embedding_layers)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict() if scheduler is not None else {}, tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        files = {p.relative_to(tmp).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        # The manifest comes last: its presence says every other file is complete.
        manifest = {"version": 1, "step": step, "files": files}
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        publish_dir_atomic(tmp, final)
    except BaseException as exc:
        # Judged before tmp is removed: torch.save's RuntimeError says nothing of the disk, and
        # the space would be free again once tmp is gone.
        error = write_error(exc, f"checkpoint step-{step}", root, lambda: resume_advice(run))
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise
        raise error from exc
    _prune(root, step, keep_last)
    log.info("saved checkpoint %s", final)
    return final


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Keep step-`step` (just written) and the keep_last-1 highest steps below it.

    Steps above the one just written belong to a timeline this run abandoned (it was resumed from an
    earlier checkpoint); left in place they would be picked as "latest" on the next resume.
    """
    older = [p for p in _step_folders(root) if _step_of(p) < step]
    doomed = older[: max(0, len(older) - (keep_last - 1))]
    doomed += [p for p in _step_folders(root) if _step_of(p) > step]
    for path in doomed:
        trash = path.with_name(f".{path.name}.deleting-{os.getpid()}")
        try:
            os.replace(path, trash)     # vanish at once, even if the delete below is slow
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
        log.info("deleted old checkpoint %s", path.name)


def clean_temp_folders(root: Path, writer: bool = False) -> list[Path]:
    """Remove folders left by a writer that died mid-checkpoint (never one whose writer still runs).

    `writer=True` (the run's own trainer, under the run lock) also settles `.step-N.old`, left by
    a writer killed while replacing step-N (it carries no pid): put back when step-N is missing
    (it is the only copy), else removed. Returns the folders removed or put back.
    """
    if not root.is_dir():
        return []
    handled = []
    for path in root.iterdir():
        match = _HIDDEN_RE.match(path.name)
        if not match:
            continue
        if match.group(2):
            pid = int(match.group(2))
            if pid == os.getpid() or process_alive(pid):
                continue
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed unfinished checkpoint folder %s", path)
            handled.append(path)
        elif writer:
            done = restore_replaced_dir(root / f"step-{match.group(1)}")
            log.info("%s checkpoint folder %s left by an interrupted replace", done, path)
            handled.append(path)
    return handled


def _step_of(path: Path) -> int:
    return int(_STEP_RE.match(path.name).group(1))


def _step_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)), key=_step_of)


def _checkpoints_root(where: RunDir | str | Path) -> Path:
    if isinstance(where, RunDir):
        return where.checkpoints_dir
    where = Path(where)
    return where / "checkpoints" if (where / "checkpoints").is_dir() else where


def list_checkpoints(where: RunDir | str | Path) -> list[Path]:
    """Published checkpoint folders of a run (or of a checkpoints/ folder), oldest step first."""
    root = _checkpoints_root(where)
    clean_temp_folders(root)
    return [p for p in _step_folders(root) if (p / MANIFEST).is_file()]


def latest_checkpoint(where: RunDir | str | Path) -> Path | None:
    """The newest checkpoint whose files match its manifest sizes; damaged ones are skipped.

    Sizes only, for listings; a resume takes `choose_checkpoint`, which checks the content.
    """
    for path in reversed(list_checkpoints(where)):
        try:
            verify_checkpoint(path, full=False)
            return path
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", path, exc.message)
    return None


@dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint a resume starts from (None: the run has none yet) and the newer ones passed
    over as damaged, each as (folder name, why)."""
    path: Path | None
    skipped: tuple[tuple[str, str], ...] = ()
    explicit: bool = False

    @property
    def step(self) -> int:
        return _step_of(self.path) if self.path is not None else 0

    def notes(self) -> list[str]:
        """What the resume says about the choice (warnings for the console and the studio log)."""
        notes = [f"Checkpoint {name} is damaged: {why}" for name, why in self.skipped]
        if self.skipped:
            notes.append(f"Resuming from {self.path.name} instead, the newest intact checkpoint.")
        return notes


def choose_checkpoint(run: RunDir, wanted: str | int | None = None) -> CheckpointChoice:
    """The checkpoint a resume starts from, each file checked against its manifest's sha256.

    wanted=None: the newest intact one; newer damaged ones are passed over and listed in
    `skipped`. wanted="step-N" (or N, or the path of one of the run's checkpoint folders): that
    one.

    Raises:
        CheckpointError: the wanted checkpoint is missing or damaged (the message names the ones
            there are), or every checkpoint of the run is damaged.
    """
    root = run.checkpoints_dir
    clean_temp_folders(root)
    folders = _step_folders(root)
    if wanted is not None and str(wanted).strip():
        return _chosen(run, folders, parse_checkpoint_step(wanted, run))
    skipped = []
    for path in reversed(folders):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            skipped.append((path.name, exc.message))
            continue
        return CheckpointChoice(path, tuple(skipped))
    if skipped:
        raise CheckpointError(
            f"No checkpoint of run {run.id} is intact: "
            + "; ".join(f"{name}: {why}" for name, why in skipped),
            "Train it again as a new run with the same settings (Duplicate on the History page, "
            f"or `cpt-studio train {run.config_path}`); the damaged checkpoints are left as they are.")
    return CheckpointChoice(None)


def _chosen(run: RunDir, folders: list[Path], step: int) -> CheckpointChoice:
    path = next((p for p in folders if _step_of(p) == step), None)
    others = [p.name for p in folders if _step_of(p) != step and (p / MANIFEST).is_file()]
    if path is None:
        raise CheckpointError(f"Run {run.id} has no checkpoint step-{step}.", _others_hint(run, others))
    try:
        verify_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"Checkpoint step-{step} of run {run.id} is damaged: {exc.message}",
                              _others_hint(run, others)) from None
    return CheckpointChoice(path, explicit=True)


def _others_hint(run: RunDir, others: list[str]) -> str:
    if not others:
        return (f"Run {run.id} has no other checkpoint. Resume without --checkpoint (from the "
                "beginning when it has none), or train it again as a new run (Duplicate).")
    return (f"Its checkpoints: {', '.join(others)}. Pick one (`cpt-studio resume {run.id} "
            f"--checkpoint {others[-1]}`), or leave out --checkpoint to take the newest intact one.")


def parse_checkpoint_step(wanted: str | int, run: RunDir) -> int:
    """The step of `step-N`, `N`, or the path of a checkpoint folder of `run`."""
    text = str(wanted).strip()
    match = re.match(r"^(?:step-)?(\d+)$", text)
    if match:
        return int(match.group(1))
    path = Path(text).expanduser()
    if _STEP_RE.match(path.name) and path.parent.resolve() == run.checkpoints_dir.resolve():
        return _step_of(path)
    raise CheckpointError(f"{text!r} is not a checkpoint of run {run.id}.",
                          "Name one as step-N (`cpt-studio resume RUN --checkpoint step-40`); "
                          "its checkpoints are the step-N folders in " f"{run.checkpoints_dir}.")


def resume_advice(run: RunDir) -> str:
    """What to do once a failure's cause is gone: resume, from the checkpoint there is (if any)."""
    checkpoint = latest_checkpoint(run)
    how = f"resume the run (`cpt-studio resume {run.id}`, or Resume on the History page)"
    if checkpoint is None:
        return f"{how}: it has no checkpoint yet, so it starts again from the beginning"
    return f"{how}: it goes on from {checkpoint.name}"


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a training checkpoint folder (not a bare adapter)."""
    path = Path(path)
    return (path / MANIFEST).is_file() and (path / "trainer_state.json").is_file()


def verify_checkpoint(path: str | Path, full: bool = True) -> dict:
    """Check every file against the manifest (size, and sha256 when `full`); returns the manifest."""
    path = Path(path)
    hint = ("Use an earlier checkpoint of the run: resume takes the newest intact one by itself, "
            "`cpt-studio resume RUN --checkpoint step-N` a given one.")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint ({MANIFEST} is missing).", hint) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / MANIFEST} is unreadable ({exc}).", hint) from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"Checkpoint file {file} is missing.", hint)
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"Checkpoint file {file} has {size} bytes, expected {expected['size']}.", hint)
        if full and file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"Checkpoint file {file} is corrupt (its sha256 does not match).", hint)
    return manifest


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None,
                    restore_rng: bool = True, verify: bool = True) -> dict:
    """Verify, then load adapter weights, optimizer/scheduler state and RNG; returns trainer_state.

    verify=False skips the sha256 check for a checkpoint `choose_checkpoint` has just checked.
    """
    from peft import set_peft_model_state_dict

    path = Path(path)
    if verify:
        verify_checkpoint(path)
    hint = "The checkpoint was made with other adapter settings (rank, targets, embeddings) or model."
    adapter = model.active_adapter if isinstance(getattr(model, "active_adapter", None), str) else "default"
    _check_adapter_config(path, model, adapter, hint)
    try:
        result = set_peft_model_state_dict(model, load_file(path / ADAPTER_WEIGHTS), adapter_name=adapter)
    except RuntimeError as exc:          # shape mismatches
        raise CheckpointError(f"{path / ADAPTER_WEIGHTS} does not fit this model: {exc}", hint) from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"{path / ADAPTER_WEIGHTS} holds weights this model lacks, e.g. "
                              f"{unexpected[0]}.", hint)
    if optimizer is not None:
        _load_state(optimizer, path / "optimizer.pt", hint)
    if scheduler is not None:
        _load_state(scheduler, path / "scheduler.pt", hint)
    if restore_rng:
        _set_rng_state(_torch_load(path / "rng.pt"))
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


_COMPARED_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "use_rslora")


def _check_adapter_config(path: Path, model, adapter: str, hint: str) -> None:
    """Refuse a checkpoint made with other adapter settings.

    Loading it anyway would not always fail: full embedding copies saved from modules_to_save load
    silently into the frozen base embeddings of a model that trains none.
    """
    try:
        saved = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read {path / 'adapter_config.json'}: {exc}", hint) from None
    current = getattr(model, "peft_config", {}).get(adapter)
    if current is None:
        raise CheckpointError(f"The model has no adapter {adapter!r} to load {path} into.", hint)
    current = current.to_dict()
    for name in _COMPARED_FIELDS:
        if _normalized(saved.get(name)) != _normalized(current.get(name)):
            raise CheckpointError(f"{path / 'adapter_config.json'}: {name} is {saved.get(name)!r}, "
                                  f"this run uses {current.get(name)!r}.", hint)


def _normalized(value):
    if isinstance(value, (list, tuple, set)):
        return sorted(str(v) for v in value)
    if value is None:
        return []                   # modules_to_save: None and [] mean the same
    return value.value if isinstance(value, enum.Enum) else value


def _torch_load(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean a bad file
        raise CheckpointError(f"Cannot read {file}: {exception_text(exc)}",
                              "The file is damaged; pick another checkpoint.") from None


def _load_state(target, file: Path, hint: str) -> None:
    try:
        target.load_state_dict(_torch_load(file))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{file} does not fit this run's {type(target).__name__}: {exc}",
                              hint) from None


def _rng_state() -> dict:
    """Every RNG a training step draws from, in types torch.load(weights_only=True) accepts."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        log.warning("not restoring CUDA RNG: the checkpoint saw %d GPU(s), this process has %d",
                    len(cuda), torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


