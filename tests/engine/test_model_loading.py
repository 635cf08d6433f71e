"""Loading a base model at each precision; tokenizer eos/pad; 4-bit CPU gradients vs float."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cpt_studio.engine.model.adapters import attach_adapters, count_parameters
from cpt_studio.engine.config import AdapterConfig
from cpt_studio.engine.errors import ModelSourceError
from cpt_studio.engine.model.loading import load_base_model, resolve_precision
from cpt_studio.engine.model.source import ResolvedModel


def folder(path) -> ResolvedModel:
    return ResolvedModel("hf_folder", str(path), "", path.name)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("auto", torch.float32)])
def test_loads_at_the_chosen_precision(tiny_model_dir, precision, dtype):
    model, tokenizer = load_base_model(folder(tiny_model_dir("llama")), precision, "cpu")
    assert model.dtype == dtype and model.device.type == "cpu"
    ids = tokenizer("Continued pretraining", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()


def test_auto_precision_is_4bit_on_cuda_and_fp32_elsewhere():
    assert resolve_precision("auto", "cuda") == "4bit"
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ModelSourceError):
        resolve_precision("int3", "cpu")


def test_tokenizer_without_pad_pads_with_eos(tmp_path, tiny_model_dir):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    raw = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "m" / name).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(tmp_path / "m")
    _, tokenizer = load_base_model(folder(tmp_path / "m"), "fp32", "cpu")
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"


def test_tokenizer_without_eos_is_refused_with_a_hint(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    config_file = tmp_path / "m" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("eos_token", None)
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelSourceError) as err:
        load_base_model(folder(tmp_path / "m"), "fp32", "cpu")
    assert "end-of-sequence" in err.value.message and "eos_token" in err.value.hint


def test_missing_weights_name_the_folder(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError) as err:
        load_base_model(folder(tmp_path / "m"), "fp32", "cpu")
    assert str(tmp_path / "m") in err.value.message and err.value.hint


def test_unknown_architecture_says_so(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    config.update(model_type="no-such-arch", architectures=["NoSuchForCausalLM"])
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelSourceError) as err:
        load_base_model(folder(tmp_path / "m"), "fp32", "cpu")
    assert "architecture" in err.value.message and "trust_remote_code" in err.value.hint


def test_4bit_lora_gradients_after_an_eval_forward_match_a_float_reference(quant_model_dir):
    import bitsandbytes as bnb
    import transformers

    model, _ = load_base_model(folder(quant_model_dir), "4bit", "cpu")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14 and not any(m.support_avx512bf16_for_cpu for m in quantized)
    assert quantized[0].weight.quant_state.quant_type == "nf4"

    # Float reference: the same base with every 4-bit weight dequantized.
    reference = transformers.LlamaForCausalLM.from_pretrained(quant_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                reference.get_submodule(name).weight.copy_(weight)
    # Frozen, and 4-bit weights counted unpacked.
    assert count_parameters(model) == (0, count_parameters(reference)[1])
    cfg = AdapterConfig(r=4, embed_tokens="off", lm_head="off")
    peft4, peft_ref = attach_adapters(model, cfg), attach_adapters(reference, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        lora = {n: p for n, p in peft4.named_parameters() if p.requires_grad}
        for name, param in peft_ref.named_parameters():
            if param.requires_grad:
                lora[name].normal_(0.0, 0.1)       # non-zero B, so A gets gradients too
                param.copy_(lora[name])

    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    peft4.eval()
    with torch.no_grad():
        peft4(input_ids=ids)      # without the workaround this repacks the weights for inference
    for m in (peft4, peft_ref):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    grads_ref = {n: p.grad for n, p in peft_ref.named_parameters() if p.requires_grad}
    for name, param in peft4.named_parameters():
        if param.requires_grad:
            ref = grads_ref[name]
            assert param.grad is not None and param.grad.abs().max() > 0, name
            assert (param.grad - ref).norm() / ref.norm() < 1e-3, name
    layer0 = [p.grad for n, p in peft4.named_parameters() if ".layers.0." in n and p.requires_grad]
    assert len(layer0) == 14 and all(g.abs().sum() > 0 for g in layer0)


# ---- what a failure while loading says -----------------------------------------------------------
SHADOW = "/home/me/src/cpt-studio/kernels/__init__.py"


def _shadowed(*args, **kwargs):
    raise ImportError(f"cannot import name 'CUDAProperties' from 'kernels' ({SHADOW})",
                      name="kernels", path=SHADOW)


def test_an_import_error_is_named_and_not_blamed_on_the_tokenizer_files(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", _shadowed)
    with pytest.raises(ModelSourceError) as err:
        load_base_model(folder(tiny_model_dir("llama")), "fp32", "cpu")
    assert "ImportError" in err.value.message and "'kernels'" in err.value.message
    assert SHADOW in err.value.message
    assert "tokenizer.json" not in err.value.hint          # the files are there
    assert "another folder" in err.value.hint and SHADOW in err.value.hint


def test_the_tokenizer_files_hint_only_where_they_are_missing(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "m" / name).unlink()
    with pytest.raises(ModelSourceError) as err:
        load_base_model(folder(tmp_path / "m"), "fp32", "cpu")
    assert "tokenizer.json" in err.value.hint


def test_an_unexpected_error_in_from_pretrained_says_what_and_where(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ModelSourceError) as err:
        load_base_model(folder(tiny_model_dir("llama")), "fp32", "cpu")
    assert "ZeroDivisionError" in err.value.message
    assert "raised in" in err.value.message and "test_model_loading.py" in err.value.message


# ---- transformers' hub kernels never run -----------------------------------------------------------
def test_transformers_hub_kernels_never_run(tiny_model_dir, monkeypatch):
    """transformers >= 5.25 kernelizes models with code from the hub when the `kernels` package is
    installed (at load, and again on model.train()); the engine turns that off for its process."""
    import importlib.util
    import os

    from cpt_studio.engine.speed.embedding_memory import free_frozen_originals

    calls = []
    if importlib.util.find_spec("kernels") is not None:
        import kernels
        from transformers.integrations import hub_kernels

        monkeypatch.setattr(kernels, "kernelize", lambda *a, **k: calls.append("kernels"))
        monkeypatch.setattr(hub_kernels, "kernelize", lambda *a, **k: calls.append("transformers"),
                            raising=False)
    assert os.environ["USE_HUB_KERNELS"] == "0"
    model, tokenizer = load_base_model(folder(tiny_model_dir("llama")), "fp32", "cpu")
    assert not getattr(model, "use_kernels", False)
    peft_model = attach_adapters(model, AdapterConfig(r=4, alpha=8, embed_tokens="full",
                                                      lm_head="full"))
    free_frozen_originals(peft_model)
    ids = tokenizer("Continued pretraining", return_tensors="pt").input_ids
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    peft_model.eval()
    peft_model.train()
    assert calls == [] and not getattr(model, "use_kernels", False)
