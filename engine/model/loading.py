"""Load a resolved base model and its tokenizer at the chosen precision.

    model, tokenizer = load_base_model(resolved, "auto", "cuda")   # 4-bit NF4 on a GPU
    model, tokenizer = load_base_model(resolved, "fp32", "cpu")

Precisions: fp32, bf16, fp16, 8bit (LLM.int8), 4bit (NF4, double quantization, compute dtype bf16
on CUDA / fp32 on CPU); auto = 4bit on CUDA, fp32 elsewhere. The tokenizer always has an eos token
and a pad token (the eos token when it has none).

Weights load from safetensors only: a pickle (`pytorch_model.bin`, `.pt`, `.ckpt`) can run code
while it is read, so it is refused, in our words. A local folder is checked before transformers
sees it: a tokenizer's vocabulary file present, every safetensors file (and shard the index
lists) present and complete, so each failure names the file and what to do.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import ModelSourceError, exception_text, import_hint, refused_pickle
from .source import ResolvedModel

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_OOM_HINT = "Pick a lower precision (4bit or 8bit), a smaller model, or close other programs."


def resolve_precision(precision: str, device: str) -> str:
    """The concrete precision of `precision` on `device` (resolves "auto")."""
    if precision == "auto":
        return "4bit" if torch.device(device).type == "cuda" else "fp32"
    if precision not in _DTYPES and precision not in ("8bit", "4bit"):
        raise ModelSourceError(f"Unknown precision {precision!r}.",
                               "Use auto, fp32, bf16, fp16, 8bit or 4bit.")
    return precision


def load_base_model(resolved: ResolvedModel, precision: str, device: str,
                    trust_remote_code: bool = False):
    """Load the frozen base model and its tokenizer.

    Args:
        resolved: from `resolve_model_source`.
        precision: auto, fp32, bf16, fp16, 8bit or 4bit.
        device: "cuda", "cuda:N", "cpu" or "mps".
        trust_remote_code: run Python code shipped with the model (only for trusted models).

    Returns:
        (model, tokenizer): the model on `device`, frozen, in eval mode.

    Raises:
        ModelSourceError: missing files, unsupported architecture, missing bitsandbytes, out of
            memory, or a tokenizer without an end-of-sequence token.
    """
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())   # the rank's GPU under torchrun
    precision = resolve_precision(precision, device)
    if trust_remote_code:
        log.warning("trust_remote_code is on: running Python code shipped with %s",
                    resolved.model_path)
    tokenizer = load_tokenizer(resolved, trust_remote_code)
    check_weight_files(resolved)
    kwargs: dict = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if precision in _DTYPES:
        kwargs["dtype"] = _DTYPES[precision]
    else:
        kwargs.update(_quantized_kwargs(precision, dev))
    log.info("loading %s (%s) on %s", resolved.model_path, precision, dev)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.model_path, **kwargs)
        if precision in _DTYPES:
            model.to(dev)
    except (torch.OutOfMemoryError, MemoryError):
        raise ModelSourceError(f"Out of memory loading {resolved.display_name or resolved.model_path}"
                               f" at {precision} on {dev}.", _OOM_HINT) from None
    except Exception as exc:   # anything else is reported as what it is, never as a crash
        raise _load_error(resolved, exc) from None
    if precision == "4bit" and dev.type == "cpu":
        _disable_cpu_bf16_repacking(model)
    model.requires_grad_(False)   # the base stays frozen; adapters add what is trained
    model.eval()
    return model, tokenizer


def load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool = False):
    """The model's tokenizer, with an eos token and a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    _check_tokenizer_files(Path(resolved.model_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.model_path,
                                                  trust_remote_code=trust_remote_code)
    except Exception as exc:
        log.debug("tokenizer of %s", resolved.model_path, exc_info=True)
        raise ModelSourceError(f"Cannot load the tokenizer of {resolved.model_path}: "
                               f"{exception_text(exc)}", _tokenizer_hint(resolved, exc)) from None
    if tokenizer.eos_token is None:
        raise ModelSourceError(f"The tokenizer of {resolved.model_path} has no end-of-sequence "
                               "token, which separates documents in continued pretraining.",
                               "Set eos_token in the folder's tokenizer_config.json (e.g. the "
                               "model's end-of-text token) and try again.")
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        # transformers 5 builds an empty tokenizer from a config whose vocabulary file is gone.
        raise ModelSourceError(f"The tokenizer of {resolved.model_path} turns text into no tokens "
                               f"(its vocabulary holds {len(tokenizer)} entries).", _COPY_TOKENIZER)
    if tokenizer.pad_token is None:
        # Padding is only used for eval/sample batches; every pad position is masked out.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# A tokenizer's vocabulary lives in one of these (fast tokenizers, SentencePiece, BPE, WordPiece,
# tiktoken, Mistral's tekken); tokenizer_config.json alone only says which class reads them.
_VOCABULARY_PATTERNS = ("tokenizer.json", "*.model", "vocab.*", "merges.txt", "*.tiktoken",
                        "tekken.json")
_COPY_TOKENIZER = ("Copy the tokenizer files that came with the model (tokenizer.json and "
                   "tokenizer_config.json, or tokenizer.model) into that folder, or pick the "
                   "model's original folder.")


def _check_tokenizer_files(folder: Path) -> None:
    """A local model folder must hold a vocabulary file; say which files are missing if not."""
    if not folder.is_dir() or any(any(folder.glob(p)) for p in _VOCABULARY_PATTERNS):
        return
    missing = "tokenizer.json (or tokenizer.model, vocab.json + merges.txt, vocab.txt)"
    if not (folder / "tokenizer_config.json").is_file():
        missing += " and tokenizer_config.json"
    raise ModelSourceError(f"The model folder {folder} has no tokenizer: it lacks {missing}.",
                           _COPY_TOKENIZER)


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_model_files(resolved: ResolvedModel) -> None:
    """A local model folder's weights and tokenizer files are there and whole (headers only, in
    milliseconds), so that the Model page can say so before any run starts."""
    check_weight_files(resolved)
    _check_tokenizer_files(Path(resolved.model_path))


def check_weight_files(resolved: ResolvedModel) -> None:
    """A local folder's weights are safetensors, present and complete; else say which file and
    what to do. Reads only each file's header (and the shard index), so it takes milliseconds."""
    folder = Path(resolved.model_path)
    if not folder.is_dir():
        return                       # a hub id: transformers fetches safetensors or says why
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_refusal(folder, ", ".join(pickles))
        raise ModelSourceError(f"The model folder {folder} holds no weights (no *.safetensors "
                               "file).", "Copy the model's weights (model.safetensors, or all its "
                               "model-0000N-of-0000M.safetensors shards) into the folder, or "
                               "convert the model again.")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text("utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelSourceError(f"{index} is unreadable ({type(exc).__name__}: {exc}).",
                                   _DOWNLOAD_AGAIN) from None
        missing = sorted(str(s) for s in shards if not (folder / str(s)).is_file())
        if missing:
            raise ModelSourceError(f"The model folder {folder} lacks weight shards its index "
                                   f"lists: {', '.join(missing)}.", _DOWNLOAD_AGAIN)
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:     # SafetensorError (no public class to catch) or OSError
            log.debug("checking %s", file, exc_info=True)
            raise ModelSourceError(
                f"The weights file {file} is damaged or incomplete ({file.stat().st_size:,} "
                f"bytes; {str(exc).split(':')[-1].strip()}): a download or copy that stopped "
                "early leaves such a file.", _DOWNLOAD_AGAIN) from None


_DOWNLOAD_AGAIN = ("Download or copy the model again (all its files), or convert it again if it "
                   "came from a .gguf file.")


def _pickle_refusal(where, files: str) -> ModelSourceError:
    return ModelSourceError(
        f"{where} holds its weights as a pickle ({files}), which CPT Studio does not load: "
        "reading a pickle can run any code hidden in it.",
        "Use the model's safetensors release (model.safetensors), or convert the weights to "
        "safetensors once, with a tool you trust, on a machine where that is safe.")


def _tokenizer_hint(resolved: ResolvedModel, exc: Exception) -> str:
    """The files hint only where a local folder really lacks them; else what the error calls for."""
    folder = Path(resolved.model_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return ("The model folder needs tokenizer.json or tokenizer_config.json (with its "
                "vocabulary files).")
    if isinstance(exc, ImportError):
        return import_hint(exc)
    return ("The tokenizer files are there but could not be read: check they are complete, or "
            "convert the model again. The log has the full traceback.")


def _quantized_kwargs(precision: str, dev: torch.device) -> dict:
    try:
        import bitsandbytes  # noqa: F401  (only to give a clear message when it is missing)
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelSourceError(f"{precision} needs the bitsandbytes package.",
                               "pip install bitsandbytes, or pick bf16/fp32.") from None
    if precision == "8bit":
        quant = BitsAndBytesConfig(load_in_8bit=True)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        # bf16 compute on GPUs that have it; fp32 on CPU, where bf16 matmuls are slow or missing.
        dtype = torch.float32
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return {"quantization_config": quant, "dtype": dtype, "device_map": {"": dev}}


def _disable_cpu_bf16_repacking(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    bitsandbytes 0.50 repacks a Linear4bit's weight on the first no-grad eval forward on such a
    CPU; gradients computed through the repacked weight afterwards are wrong (layer-0 LoRA grads
    came out exactly zero here). The flag is a per-module attribute, so this touches only this
    model instance.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _load_error(resolved: ResolvedModel, exc: Exception) -> ModelSourceError:
    log.debug("loading %s", resolved.model_path, exc_info=exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = resolved.display_name or resolved.model_path
    if isinstance(exc, ImportError):
        return ModelSourceError(f"Cannot load {where}: {exception_text(exc)}", import_hint(exc))
    if refused_pickle(exc):
        # torch's own text advises weights_only=False: never pass that on.
        return _pickle_refusal(where, "a .bin or .pt file")
    hub = not Path(resolved.model_path).is_dir()
    if isinstance(exc, OSError) and "safetensors" in text and hub:
        return ModelSourceError(f"{where} has no safetensors weights on the hub: {text}",
                                _pickle_refusal(where, "").hint)
    if "out of memory" in text.lower():
        return ModelSourceError(f"Out of memory loading {where}.", _OOM_HINT)
    if isinstance(exc, (KeyError, ValueError)) and ("model_type" in text or "architecture" in text
                                                    or "does not recognize" in text):
        return ModelSourceError(f"{where} has an architecture this transformers version does not "
                                f"support: {text}",
                                "Update transformers, or turn on trust_remote_code if the model "
                                "ships its own code and you trust it.")
    if isinstance(exc, OSError):
        return ModelSourceError(f"Files of {where} are missing or unreadable: {text}",
                                "Check the folder holds config.json and the weights "
                                "(*.safetensors), or convert the model again.")
    return ModelSourceError(f"Cannot load {where}: {exception_text(exc)}",
                            "Check the model files, or pick another precision or model.")
