"""Load a resolved base model and its tokenizer at the chosen precision.

    model, tokenizer = load_base_model(resolved, "auto", "cuda")   # 4-bit NF4 on a GPU
    model, tokenizer = load_base_model(resolved, "fp32", "cpu")

Precisions: fp32, bf16, fp16, 8bit (LLM.int8), 4bit (NF4, double quantization, compute dtype bf16
on CUDA / fp32 on CPU); auto = 4bit on CUDA, fp32 elsewhere. The tokenizer always has an eos token
and a pad token (the eos token when it has none).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ModelSourceError, exception_text, import_hint
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
    kwargs: dict = {"trust_remote_code": trust_remote_code}
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
    if tokenizer.pad_token is None:
        # Padding is only used for eval/sample batches; every pad position is masked out.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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
