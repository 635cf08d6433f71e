"""Atomic, verifiable training checkpoints: `runs/<id>/checkpoints/step-<N>/`.

    path = save_checkpoint(run, step, model, optimizer, scheduler, {"step": step, ...}, keep_last=3)
    path = latest_checkpoint(run)                        # newest complete one, or None
    state = load_checkpoint(path, model, optimizer, scheduler)   # -> trainer_state dict

A checkpoint is written into `checkpoints/.step-<N>.tmp-<pid>-<random>/` and renamed into place once
complete, so a `step-<N>` folder exists only when every file and the manifest (sha256 + size of
each file) were written. Weights go through safetensors and `torch.load(weights_only=True)` only.
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
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..atomic import file_sha256, publish_dir_atomic, write_text_atomic
from ..errors import CheckpointError, exception_text
from .store import RunDir, process_alive

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_STEP_RE = re.compile(r"^step-(\d+)$")
# Hidden work folders: .step-N.tmp-<pid>-<rand>, .step-N.deleting-<pid>, .step-N.old
_HIDDEN_RE = re.compile(r"^\.step-\d+\.(?:(?:tmp|deleting)-(\d+)(?:-\w+)?|old)$")
_DISK_HINT = "Check free disk space and that the run folder is writable."


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
        # torch.save reports a full disk as a RuntimeError; look at the disk before freeing tmp.
        disk_full = isinstance(exc, RuntimeError) and _free_bytes(root) < 64 << 20
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or disk_full:
            reason = "the disk is full" if disk_full else (getattr(exc, "strerror", None) or exc)
            raise CheckpointError(f"Could not write checkpoint {final}: {reason}.", _DISK_HINT) from exc
        raise
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


def clean_temp_folders(root: Path, writer: bool = False) -> None:
    """Remove folders left by a writer that died mid-checkpoint (never one whose writer still runs).

    `writer=True` (the run's own trainer) also removes `.step-N.old` leftovers of an interrupted
    replace, which carry no pid.
    """
    if not root.is_dir():
        return
    for path in root.iterdir():
        match = _HIDDEN_RE.match(path.name)
        if not match:
            continue
        if match.group(1):
            pid = int(match.group(1))
            dead = pid != os.getpid() and not process_alive(pid)
        else:
            dead = writer
        if dead:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed unfinished checkpoint folder %s", path)


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
    """The newest checkpoint whose files match its manifest sizes; damaged ones are skipped."""
    for path in reversed(list_checkpoints(where)):
        try:
            verify_checkpoint(path, full=False)
            return path
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", path, exc.message)
    return None


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a training checkpoint folder (not a bare adapter)."""
    path = Path(path)
    return (path / MANIFEST).is_file() and (path / "trainer_state.json").is_file()


def verify_checkpoint(path: str | Path, full: bool = True) -> dict:
    """Check every file against the manifest (size, and sha256 when `full`); returns the manifest."""
    path = Path(path)
    hint = "Pick an earlier checkpoint (the run keeps the last few) or start a fresh run."
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
                    restore_rng: bool = True) -> dict:
    """Verify, then load adapter weights, optimizer/scheduler state and RNG; returns trainer_state."""
    from peft import set_peft_model_state_dict

    path = Path(path)
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


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62

