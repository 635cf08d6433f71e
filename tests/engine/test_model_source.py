"""Resolving model sources (folders, adapters, runs, GGUF, hub ids) and describing models."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import build_tiny_model
from cpt_studio.engine.model.adapters import attach_adapters
from cpt_studio.engine.config import AdapterConfig
from cpt_studio.engine.errors import ModelSourceError
from cpt_studio.engine.model.loading import load_base_model
from cpt_studio.engine.model.source import (default_model_path, describe_model,
                                            resolve_model_source)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, smollm2_gguf):
    """The real SmolLM2 GGUF converted once for this module: (models_dir, resolved, progress calls)."""
    models_dir = tmp_path_factory.mktemp("models")
    calls = []
    resolved = resolve_model_source(str(smollm2_gguf), models_dir,
                                    progress=lambda fraction, message: calls.append(fraction))
    return models_dir, resolved, calls


def save_adapter(base_dir, out_dir, mode="off"):
    """Train nothing, just save a LoRA adapter of the model in base_dir (peft records base_dir)."""
    from transformers import AutoModelForCausalLM

    model = attach_adapters(AutoModelForCausalLM.from_pretrained(base_dir),
                            AdapterConfig(r=2, embed_tokens=mode, lm_head=mode))
    model.save_pretrained(out_dir)
    return model


def write_manifest(folder, step):
    """A checkpoint manifest like engine/runs/checkpoints.py writes (sizes + sha256 of each file)."""
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    files = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
             for p in folder.iterdir() if p.is_file()}
    (folder / "manifest.json").write_text(json.dumps({"version": 1, "step": step, "files": files}))


def test_default_model_is_the_smollm2_gguf(smollm2_gguf):
    assert default_model_path() == smollm2_gguf


def test_hf_folder_resolves_to_itself(tiny_model_dir, tmp_path):
    resolved = resolve_model_source(str(tiny_model_dir("qwen2")), tmp_path)
    assert resolved.kind == "hf_folder" and resolved.model_path == str(tiny_model_dir("qwen2"))
    assert resolved.adapter_path == ""


def test_adapter_folder_resolves_its_base_from_adapter_config(tiny_model_dir, tmp_path):
    save_adapter(tiny_model_dir("llama"), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir("llama"))
    resolved = resolve_model_source(str(tmp_path / "adapter"), tmp_path / "models")
    assert resolved.kind == "adapter"
    assert resolved.model_path == str(tiny_model_dir("llama"))
    assert resolved.adapter_path == str(tmp_path / "adapter")


def test_run_folder_resolves_to_its_latest_adapter(tiny_model_dir, tmp_path):
    run = tmp_path / "runs" / "my-run"
    save_adapter(tiny_model_dir("llama"), run / "adapter")
    (run / "config.yaml").write_text("name: my-run\n")
    (run / "adapter" / "trainer_state.json").write_text(json.dumps({"step": 3}))
    assert resolve_model_source(str(run), tmp_path).adapter_path == str(run / "adapter")
    step5 = run / "checkpoints" / "step-5"
    shutil.copytree(run / "adapter", step5)
    write_manifest(step5, 5)
    resolved = resolve_model_source(str(run), tmp_path)
    assert resolved.adapter_path == str(step5) and resolved.model_path == str(tiny_model_dir("llama"))


def test_missing_path_and_non_model_folder_are_named(tmp_path):
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source(str(tmp_path / "nowhere"), tmp_path)
    assert str(tmp_path / "nowhere") in err.value.message and err.value.hint
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source(str(tmp_path / "notes"), tmp_path)
    assert str(tmp_path / "notes") in err.value.message and "config.json" in err.value.message
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source(str(tmp_path / "notes" / "readme.txt"), tmp_path)
    assert "readme.txt" in err.value.message and ".gguf" in err.value.message


def test_adapter_with_a_missing_base_says_so(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source(str(tmp_path / "adapter"), tmp_path)
    assert str(tmp_path / "adapter") in err.value.message and str(tmp_path / "gone") in err.value.message


def test_hub_id_offline_gives_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source("some-org/some-model-that-is-not-cached", tmp_path)
    assert "can't be reached" in err.value.message and "local" in err.value.hint


def test_broken_gguf_leaves_no_folder_and_cleans_dead_temps(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    models = tmp_path / "models"
    models.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from cpt_studio.engine.model.source import _content_hash

    stale = models / f".broken-{_content_hash(tmp_path / 'broken.gguf')}.tmp-{dead.pid}-x"
    stale.mkdir()
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source(str(tmp_path / "broken.gguf"), models)
    assert "broken.gguf" in err.value.message
    assert list(models.iterdir()) == []


def test_describe_tiny_models_without_loading_weights(tiny_model_dir, tmp_path):
    for arch, tied in (("llama", True), ("mistral", False), ("qwen2", False)):
        info = describe_model(resolve_model_source(str(tiny_model_dir(arch, tied)), tmp_path))
        real = build_tiny_model(arch, tied, vocab_size=384)
        assert info.n_params == sum(p.numel() for p in real.parameters())
        assert info.tied_embeddings is tied and info.vocab_size == 384 and info.hidden_size == 32
        assert info.n_layers == 2 and info.linear_module_names == PROJECTIONS
        assert info.linear_module_shapes["k_proj"] == (32, 16)


@pytest.mark.slow   # the first of these converts the real GGUF (~20 s on 2 cores)
def test_gguf_converts_once_and_is_reused(converted, smollm2_gguf):
    models_dir, resolved, calls = converted
    assert resolved.kind == "gguf" and resolved.gguf_file == str(smollm2_gguf)
    folders = [p for p in models_dir.iterdir()]
    assert [p.name.rsplit("-", 1)[0] for p in folders] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert calls[0] == 0.0 and calls[-1] == 1.0 and calls == sorted(calls)
    stamps = {p.name: p.stat().st_mtime_ns for p in folders[0].iterdir()}
    again_calls = []
    again = resolve_model_source(str(smollm2_gguf), models_dir,
                                 progress=lambda f, m: again_calls.append(f))
    assert again == resolved and again_calls == []
    assert list(models_dir.iterdir()) == folders
    assert {p.name: p.stat().st_mtime_ns for p in folders[0].iterdir()} == stamps


@pytest.mark.slow
def test_adapter_whose_base_was_a_gguf_resolves_to_the_converted_folder(converted, smollm2_gguf,
                                                                        tmp_path):
    models_dir, resolved, _ = converted
    for base in (str(smollm2_gguf), resolved.model_path):
        (tmp_path / "adapter").mkdir(exist_ok=True)
        (tmp_path / "adapter" / "adapter_config.json").write_text(
            json.dumps({"base_model_name_or_path": base}))
        via_adapter = resolve_model_source(str(tmp_path / "adapter"), models_dir)
        assert via_adapter.kind == "adapter" and via_adapter.model_path == resolved.model_path


@pytest.mark.slow
def test_converted_gguf_describes_and_loads(converted):
    _, resolved, _ = converted
    info = describe_model(resolved)
    assert info.architecture == "LlamaForCausalLM" and info.tied_embeddings
    assert 130e6 < info.n_params < 140e6 and info.vocab_size == 49152
    assert info.linear_module_names == PROJECTIONS
    model, tokenizer = load_base_model(resolved, "fp32", "cpu")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    assert tokenizer.eos_token and tokenizer.pad_token


def test_hub_id_without_network_gives_a_clear_message(monkeypatch, tmp_path):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    with pytest.raises(ModelSourceError) as err:
        resolve_model_source("some-org/some-model-that-is-not-cached", tmp_path)
    assert "can't be reached" in err.value.message and "local" in err.value.hint


def test_a_full_disk_while_a_gguf_is_converted_says_so_and_leaves_nothing(tmp_path, monkeypatch):
    """The conversion used to blame the file ("re-download it") when the disk was full."""
    import transformers
    from safetensors import SafetensorError

    from cpt_studio.engine.errors import DiskFullError

    class FillsTheDisk:
        def save_pretrained(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"\0" * 4096)
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00 a model")
    models = tmp_path / "models"
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: FillsTheDisk())
    with pytest.raises(DiskFullError) as err:
        resolve_model_source(str(gguf), models)
    assert f"the model converted from model.gguf in {models}" in err.value.message
    assert err.value.hint.startswith(f"Free space at {models}, then start again")
    assert list(models.iterdir()) == []
