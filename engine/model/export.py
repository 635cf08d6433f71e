"""Export a run (or any adapter / checkpoint folder) as one merged Hugging Face model, verified.

    result = export_merged("20250101-120000-law-de", None, workspace, dtype="bf16")
    result.path            # runs/<id>/exports/merged-bf16/ (config, model.safetensors, tokenizer)
    result.max_abs_diff    # its logits against the unmerged adapter model, on a few token ids

Steps: resolve the adapter (a run's newest one: final adapter/ or latest checkpoint) and its base
model (`resolve_model_source`); load the base unquantized in fp32 on the CPU (an adapter trained
on a 4-bit or 8-bit base is merged into the original weights: quantized weights cannot take a
LoRA delta exactly); attach the adapter with `attach_adapters(init_from=...)`, so tied
embeddings with a LoRA merge once (`TiedLoraHead`) and fully trained embed_tokens/lm_head replace
the base's; record reference logits; `merge_and_unload()` in fp32, then cast to the requested
dtype (each weight W + dW rounded once); save the model (safetensors) and the base's tokenizer
into a hidden temp folder next to the destination; load that folder back with
`AutoModelForCausalLM` in fp32 and compare its logits with the reference; only then rename the
folder into place (`publish_dir_atomic`). A failed check, a full disk or any error leaves no
half export behind. Memory: about 4 bytes per parameter (the fp32 model), checked before loading.

The check runs in fp32 on both sides, so what it measures is what the saved dtype loses, not the
arithmetic noise of a 16-bit forward pass: comparing a bf16 merged model with a bf16 unmerged one
mixes two forward passes that each stray up to ~4 logits from the exact result on SmolLM2-135M,
and refused correct exports. Tolerance (max |logit difference|, scaled by the logits' size
s = max(1, max |logit|)): fp32 1e-4 * s (summation order), fp16 1e-2 * s, bf16 6e-2 * s; on a
SmolLM2-135M adapter the saved weights alone cost 1.3e-3 * s in fp16 and 1.0e-2 * s in bf16.

Default destinations: `runs/<id>/exports/merged-<dtype>/` for a run or its final adapter,
`runs/<id>/exports/merged-<dtype>-step-<N>/` for one of its checkpoints, and
`<folder>-merged-<dtype>/` next to an adapter folder outside any run. `export_info.json` in the
export records the adapter, the base, the dtype and the check.

Known gap: GGUF export (llama.cpp's convert_hf_to_gguf on the merged folder, then quantize) is not
built yet; only the merged safetensors model is.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from ..atomic import publish_dir_atomic, write_text_atomic
from ..errors import CheckpointError, CptError, DiskFullError, WorkspaceError, is_disk_full

log = logging.getLogger(__name__)

DTYPES = ("bf16", "fp32", "fp16")
_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 6e-2}
_N_CHECK_TOKENS = 24
INFO_FILE = "export_info.json"
Progress = Optional[Callable[[float, str], None]]
_STEP_RE = re.compile(r"^step-\d+$")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how well the check went.

    Attributes:
        path: the merged model folder.
        dtype: bf16, fp32 or fp16.
        n_params: parameters of the merged model (a tied matrix counts once).
        max_abs_diff: max |logit| difference, merged-and-reloaded vs the unmerged adapter model
            (both computed in fp32).
        seconds: wall time of the whole export.
        tolerance: the bound max_abs_diff had to stay within.
        adapter_effect: max |logit| difference the adapter makes over the bare base (for scale).
        adapter_path: the adapter or checkpoint folder that was merged.
        base_model: the base model folder (or hub id) it was merged into.
    """

    path: Path
    dtype: str
    n_params: int
    max_abs_diff: float
    seconds: float
    tolerance: float = 0.0
    adapter_effect: float = 0.0
    adapter_path: str = ""
    base_model: str = ""

    def summary(self) -> str:
        """One line for people: the check's numbers."""
        return (f"verified: max |logit difference| {self.max_abs_diff:.2e} against the unmerged "
                f"adapter (tolerance {self.tolerance:.1e}; the adapter itself moves logits by up "
                f"to {self.adapter_effect:.3g})")


def default_out_dir(source_folder: str | Path, dtype: str) -> Path:
    """Where an export of this run / adapter / checkpoint folder goes by default (see the module doc)."""
    path = Path(source_folder)
    run = run_of(path)
    if run is not None and path != run:
        suffix = f"-{path.name}" if _STEP_RE.match(path.name) else ""
        return run / "exports" / f"merged-{dtype}{suffix}"
    if (path / "config.yaml").is_file():
        return path / "exports" / f"merged-{dtype}"
    return path.with_name(f"{path.name}-merged-{dtype}")


def run_of(folder: Path) -> Path | None:
    """The run folder of a run, of its final adapter/ or of one of its checkpoints (else None)."""
    folder = Path(folder)
    if _STEP_RE.match(folder.name) and folder.parent.name == "checkpoints":
        folder = folder.parent.parent
    elif folder.name == "adapter":
        folder = folder.parent
    return folder if (folder / "config.yaml").is_file() else None


def resolve_export_source(source: str | Path, workspace) -> tuple[Path, Path]:
    """(adapter or checkpoint folder to merge, the folder the source names) for a run id or folder.

    A run (id or folder) gives its newest adapter: the final adapter/ or the latest complete
    checkpoint, whichever is newer.

    Raises:
        WorkspaceError: no run of that id and no such folder.
        CheckpointError: a run with no adapter or checkpoint yet; a folder that is no adapter.
    """
    from .source import latest_run_adapter

    text = str(source or "").strip()
    if not text:
        raise WorkspaceError("No run given to export.", "Give a run id (see `cpt-studio runs`), "
                             "a run folder, or an adapter or checkpoint folder.")
    path = Path(text).expanduser()
    if not path.is_dir():
        path = workspace.get_run(text).path   # raises "There is no run ..." for an unknown id
    path = path.resolve()
    if (path / "adapter_config.json").is_file():
        return path, path
    if (path / "config.yaml").is_file():
        adapter = latest_run_adapter(path)
        if adapter is None:
            raise CheckpointError(f"Run {path.name} has no saved adapter or checkpoint yet.",
                                  "Let it train until it saves a checkpoint (checkpoint.every_steps), "
                                  "or stop it with Stop and save.")
        return adapter, path
    raise CheckpointError(f"{path} is not a run folder, an adapter folder or a checkpoint folder "
                          "(no config.yaml or adapter_config.json in it).",
                          "Give a run id (see `cpt-studio runs`), a run folder, or a folder with "
                          "adapter_config.json.")


def export_merged(source: str | Path, out_dir: Path | None, workspace, dtype: str = "bf16",
                  progress: Progress = None, overwrite: bool = False,
                  trust_remote_code: bool | None = None) -> ExportResult:
    """Merge an adapter into its base model, save it, and verify it by loading it back.

    Args:
        source: a run id, a run folder, an adapter folder or a checkpoint folder.
        out_dir: destination folder (None: the default, see `default_out_dir`).
        workspace: the `Workspace` (run ids, and models/ for a GGUF base converted once).
        dtype: bf16, fp32 or fp16: the merged model is saved in it (merged in fp32).
        progress: optional `progress(fraction, message)`.
        overwrite: replace an existing export at `out_dir` (never a folder that is not one).
        trust_remote_code: run code shipped with the base model; None = the run's setting (False
            for an adapter outside any run).

    Raises:
        CptError: unknown run, nothing to export yet, bad dtype, destination exists, out of disk
            space, base model unavailable, or the check failed (subclasses say which);
            RunBusy while another process writes the run (a trainer prunes the checkpoints).
    """
    from ..runs.lock import RunLock
    run = run_of(resolve_export_source(source, workspace)[0])
    with RunLock(run, "export") if run is not None else contextlib.nullcontext():
        return _export_merged(source, out_dir, workspace, dtype, progress, overwrite,
                              trust_remote_code)


def _export_merged(source, out_dir, workspace, dtype, progress, overwrite,
                   trust_remote_code) -> ExportResult:
    started = time.monotonic()
    report = progress or (lambda fraction, message="": None)
    if dtype not in DTYPES:
        raise CptError(f"Unknown export dtype {dtype!r}.", f"Use one of: {', '.join(DTYPES)}.")
    report(0.0, "Finding the adapter and its base model")
    adapter, named = resolve_export_source(source, workspace)
    run = run_of(adapter)
    final = Path(out_dir).expanduser().resolve() if out_dir else default_out_dir(named, dtype)
    _check_destination(final, overwrite, adapter, run)
    _check_adapter_intact(adapter)
    if trust_remote_code is None:
        trust_remote_code = _run_trusts_remote_code(run)

    from .source import resolve_model_source
    resolved = resolve_model_source(str(adapter), workspace.models_dir,
                                    lambda f, m="": report(0.1 * f, m))

    import torch
    from .loading import _DTYPES, load_base_model

    _check_memory(resolved, trust_remote_code)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temps(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    except OSError as exc:
        raise WorkspaceError(f"Cannot create the output folder {final}: {exc.strerror or exc}.",
                             "Pick an output folder you can write to.") from None
    try:
        report(0.1, "Loading the base model (fp32, CPU)")
        model, _ = load_base_model(resolved, "fp32", "cpu", trust_remote_code=trust_remote_code)
        report(0.3, "Attaching the adapter")
        from .adapters import attach_adapters
        from ..config import AdapterConfig
        peft_model = attach_adapters(model, AdapterConfig(), init_from=str(adapter))
        peft_model.eval()
        peft_model.requires_grad_(False)
        ids = _check_ids(peft_model)
        with torch.no_grad():
            reference = peft_model(input_ids=ids).logits.float()
            with peft_model.disable_adapter():
                bare = peft_model(input_ids=ids).logits.float()
        effect = float((reference - bare).abs().max())
        del bare
        report(0.4, "Merging the adapter into the base weights")
        with warnings.catch_warnings():   # ties are handled by attach_adapters (TiedLoraHead)
            warnings.filterwarnings("ignore", message=r".*tie_word_embeddings.*")
            merged = peft_model.merge_and_unload()
        del peft_model, model
        merged.to(_DTYPES[dtype])     # in place: tied weights stay one tensor
        n_params = sum(p.numel() for p in merged.parameters())
        _check_free_space(final.parent, n_params * torch.finfo(merged.dtype).bits // 8)
        report(0.5, f"Saving the merged model ({n_params / 1e6:,.0f}M parameters)")
        _save(merged, tmp)
        del merged
        gc.collect()
        _save_tokenizer(resolved.model_path, tmp, trust_remote_code)
        report(0.8, "Checking the saved model against the adapter")
        diff, tolerance = _verify(tmp, ids, reference, dtype, trust_remote_code)
        result = ExportResult(path=final, dtype=dtype, n_params=int(n_params), max_abs_diff=diff,
                              seconds=0.0, tolerance=tolerance, adapter_effect=effect,
                              adapter_path=str(adapter), base_model=resolved.model_path)
        info = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
        info.update(check_tokens=len(ids[0]), gguf_source=resolved.gguf_file, created=time.time())
        for key in ("seconds", "path"):
            info.pop(key)
        write_text_atomic(tmp / INFO_FILE, json.dumps(info, indent=1))
        _make_readable(tmp)
        report(0.95, f"Publishing {final}")
        _check_destination(final, overwrite, adapter, run)   # nobody wrote there meanwhile
        publish_dir_atomic(tmp, final)
    except BaseException as exc:
        # Judged before tmp is removed (its files are what fills the disk).
        full = not isinstance(exc, CptError) and is_disk_full(exc, final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, CptError):
            raise
        if full:                              # ENOSPC / EDQUOT, as safetensors or torch wrap it
            raise DiskFullError(f"The disk is full: could not write the merged model to {final}.",
                                f"Free space at {final.parent} (a merged model is about the base "
                                "model's size at that dtype), or pick another output folder.") from exc
        if isinstance(exc, OSError):
            raise WorkspaceError(f"Could not write the merged model to {final}: "
                                 f"{exc.strerror or exc}.",
                                 "Check the folder is writable, or pick another one.") from exc
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            raise CptError("Out of memory while merging the adapter (the base is loaded "
                           "unquantized, in fp32, on the CPU).",
                           "Close other programs, or export on a machine with more memory.") from exc
        raise
    seconds = time.monotonic() - started
    report(1.0, f"Exported {final}")
    log.info("exported %s (%s) to %s in %.1fs, max |logit diff| %.2e", adapter, dtype, final,
             seconds, result.max_abs_diff)
    return ExportResult(**{**asdict(result), "seconds": seconds})


def _check_destination(final: Path, overwrite: bool, adapter: Path, run: Path | None) -> None:
    if final.is_relative_to(adapter) or any(keep.is_relative_to(final)
                                            for keep in filter(None, (adapter, run))):
        raise WorkspaceError(f"The output folder {final} would replace or sit inside the adapter "
                             "being exported.", "Pick an output folder outside the run's adapter "
                             "and checkpoints (the default is the run's exports/ folder).")
    if not final.exists():
        return
    if not final.is_dir():
        raise WorkspaceError(f"{final} exists and is a file.", "Pick another output folder.")
    if not overwrite:
        raise WorkspaceError(f"{final} already exists.",
                             "Pass --overwrite (or tick Overwrite) to replace it, or pick another "
                             "output folder.")
    if any(final.iterdir()) and not (final / INFO_FILE).is_file():
        raise WorkspaceError(f"{final} is not empty and not an earlier export (no {INFO_FILE}); "
                             "it is not replaced.", "Pick a new output folder, or empty it yourself.")


def _check_adapter_intact(adapter: Path) -> None:
    from ..runs.checkpoints import is_checkpoint, verify_checkpoint

    if is_checkpoint(adapter):
        verify_checkpoint(adapter, full=True)


def _run_trusts_remote_code(run: Path | None) -> bool:
    if run is None:
        return False
    from ..runs.store import RunDir

    model = RunDir(run).raw_config().get("model")
    return bool(model.get("trust_remote_code")) if isinstance(model, dict) else False


def _check_ids(model):
    """A few token ids spread over the whole vocabulary (trained embedding rows included)."""
    import torch

    vocab = int(model.get_input_embeddings().weight.shape[0])
    n = min(_N_CHECK_TOKENS, vocab)
    return torch.linspace(0, vocab - 1, n).round().long().unsqueeze(0)


def _save(model, folder: Path) -> None:
    import inspect

    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True   # transformers 4.x; 5.x writes safetensors only
    model.save_pretrained(str(folder), **kwargs)
    if not any(folder.glob("*.safetensors")):
        raise CptError(f"Saving the merged model wrote no .safetensors file into {folder}.",
                       "Update transformers and try again.")


def _save_tokenizer(model_path: str, folder: Path, trust_remote_code: bool) -> None:
    """The base's tokenizer as it is (load_tokenizer would add a pad token)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise CptError(f"Cannot load the tokenizer of {model_path} to save with the export: {exc}",
                       "The base model folder needs its tokenizer files.") from None
    tokenizer.save_pretrained(str(folder))


def _verify(folder: Path, ids, reference, dtype: str, trust_remote_code: bool) -> tuple[float, float]:
    """Load the saved folder back in fp32 (its weights exactly as saved) and compare its logits
    with the unmerged model's, also computed in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    hint = ("The export was not kept. Try fp32 (a 16-bit merge rounds the adapter's small changes "
            "away); if fp32 fails too, report it with the run's adapter_config.json.")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                      trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CptError(f"The merged model does not load back: {exc}", hint) from None
    loaded.eval()
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits.float()
    del loaded
    gc.collect()
    scale = max(1.0, float(reference.abs().max()))
    tolerance = _TOLERANCE[dtype] * scale
    if logits.shape != reference.shape:
        raise CptError(f"The merged model's logits have shape {tuple(logits.shape)}, the adapter "
                       f"model's {tuple(reference.shape)}.", hint)
    if not torch.isfinite(logits).all():
        raise CptError(f"The merged model gives non-finite logits once saved in {dtype}.",
                       "fp16 overflows for some models: export in bf16 or fp32." if dtype == "fp16"
                       else hint)
    diff = float((logits - reference).abs().max())
    if not diff <= tolerance:
        raise CptError(f"The merged model does not match the adapter model: max |logit "
                       f"difference| {diff:.3g} > tolerance {tolerance:.3g} ({dtype}).", hint)
    return diff, tolerance


def _check_memory(resolved, trust_remote_code: bool) -> None:
    """Refuse before loading when the fp32 model cannot fit in the memory available now (the
    kernel's OOM killer would end the process without a word)."""
    import psutil

    from .source import describe_model

    try:
        needed = describe_model(resolved, trust_remote_code).n_params * 4 * 1.1
    except CptError as exc:   # a model that cannot be described fails with its own message later
        log.debug("no parameter count for the memory check: %s", exc)
        return
    available = psutil.virtual_memory().available
    if needed > available:
        raise CptError(f"Exporting this model needs about {needed / 1e9:.1f} GB of free memory "
                       f"(the base in fp32 on the CPU); {available / 1e9:.1f} GB are available.",
                       "Close other programs, or export on a machine with more memory.")


def _make_readable(folder: Path) -> None:
    """rwxr-xr-x / rw-r--r--: the temp folder and some writers create owner-only files."""
    os.chmod(folder, 0o755)
    for path in folder.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _check_free_space(folder: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed * 1.02 + (16 << 20):
        raise WorkspaceError(f"Not enough disk space for the merged model in {folder}: it needs "
                             f"about {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB are free.",
                             "Free some space or pick another output folder.")


def _remove_dead_temps(final: Path) -> None:
    """Half-written folders of `final` whose writer process is gone (runs/leftovers.py's rule)."""
    from ..runs.leftovers import remove_dead_temp_dirs

    remove_dead_temp_dirs(final)
