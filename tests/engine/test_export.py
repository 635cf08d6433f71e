"""Export to a merged model: every embed/head mode merges to the adapter's logits, and refusals."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cpt_studio.engine.model.adapters import attach_adapters
from cpt_studio.engine.config import AdapterConfig, RunConfig
from cpt_studio.engine.errors import CheckpointError, CptError, WorkspaceError
from cpt_studio.engine.model.export import INFO_FILE, default_out_dir, export_merged
from cpt_studio.engine.runs.store import Workspace


def make_run(workspace, model_dir, embed="full", head="full", seed=0):
    """A run folder whose adapter/ holds a non-identity adapter (its weights perturbed)."""
    cfg = RunConfig(name="export me")
    cfg.model.source = str(model_dir)
    run = workspace.create_run(cfg)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    model = attach_adapters(base, AdapterConfig(r=4, alpha=8, embed_tokens=embed, lm_head=head))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(run.adapter_dir))
    return run, model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def workspace(tmp_path):
    return Workspace(tmp_path / "ws")


@pytest.mark.parametrize("tied, embed, head", [
    (False, "full", "full"),      # untied, both fully trained
    (True, "full", "full"),       # tied, one shared trained copy
    (True, "lora", "lora"),       # tied, one LoRA on the shared matrix (merged once)
    (False, "off", "lora"),       # untied, LoRA on lm_head only
])
def test_fp32_export_gives_the_adapter_logits(workspace, tiny_model_dir, tied, embed, head):
    run, adapted = make_run(workspace, tiny_model_dir("llama", tied), embed, head)
    seen = []
    result = export_merged(run.id, None, workspace, dtype="fp32",
                           progress=lambda f, m="": seen.append(f))
    assert result.path == run.exports_dir / "merged-fp32"
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["merged-fp32"]   # no temp left
    assert result.max_abs_diff <= 1e-4 and result.adapter_effect > 1e-3
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    merged = AutoModelForCausalLM.from_pretrained(str(result.path)).eval()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    assert (logits(merged, ids) - logits(adapted, ids)).abs().max().item() < 1e-4
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
    assert result.n_params == sum(p.numel() for p in merged.parameters())
    assert not any("lora" in k for k in merged.state_dict())
    info = json.loads((result.path / INFO_FILE).read_text())
    assert info["adapter_path"] == str(run.adapter_dir.resolve()) and info["dtype"] == "fp32"
    assert (result.path / "tokenizer_config.json").is_file()


def test_bf16_export_of_a_checkpoint_folder(workspace, tiny_model_dir):
    run, _ = make_run(workspace, tiny_model_dir("llama"))
    step = run.checkpoints_dir / "step-3"
    step.parent.mkdir()
    run.adapter_dir.rename(step)                      # a bare adapter folder under checkpoints/
    result = export_merged(step, None, workspace, dtype="bf16")
    assert result.path == run.exports_dir / "merged-bf16-step-3"
    assert result.max_abs_diff <= result.tolerance
    merged = AutoModelForCausalLM.from_pretrained(str(result.path))
    assert merged.dtype == torch.bfloat16


def test_bf16_export_of_a_real_model_passes_its_own_check(workspace, smollm2_gguf):
    """SmolLM2-135M (30 layers): two bf16 forward passes each stray up to ~4 logits from the exact
    result, so comparing a bf16 merge with a bf16 unmerged model refused this correct export
    (6.19 > 1.91). The check now compares both sides in fp32."""
    from cpt_studio.engine.model.loading import load_base_model
    from cpt_studio.engine.model.source import resolve_model_source

    resolved = resolve_model_source(str(smollm2_gguf), workspace.models_dir)
    cfg = RunConfig(name="real export")
    cfg.model.source = str(smollm2_gguf)
    run = workspace.create_run(cfg)
    base, _ = load_base_model(resolved, "fp32", "cpu", False)
    torch.manual_seed(0)
    model = attach_adapters(base, AdapterConfig(r=8, alpha=16, embed_tokens="full", lm_head="full"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.002)
    model.save_pretrained(str(run.adapter_dir))
    del model, base
    result = export_merged(run.id, None, workspace)          # the default: bf16
    assert result.dtype == "bf16" and result.max_abs_diff <= result.tolerance / 2
    assert result.adapter_effect > result.max_abs_diff
    merged = AutoModelForCausalLM.from_pretrained(str(result.path))
    assert merged.dtype == torch.bfloat16
    assert merged.lm_head.weight is merged.model.embed_tokens.weight   # SmolLM2 is tied


def test_unknown_run_and_run_without_adapter_are_clear_errors(workspace, tiny_model_dir):
    with pytest.raises(WorkspaceError, match="There is no run 'nope'"):
        export_merged("nope", None, workspace)
    cfg = RunConfig(name="empty")
    cfg.model.source = str(tiny_model_dir("llama"))
    run = workspace.create_run(cfg)
    with pytest.raises(CheckpointError, match="no saved adapter or checkpoint yet"):
        export_merged(run.id, None, workspace)


def test_existing_output_is_refused_without_overwrite(workspace, tiny_model_dir, tmp_path):
    run, _ = make_run(workspace, tiny_model_dir("llama"), embed="off", head="off")
    out = tmp_path / "out"
    (out / "keep.txt").parent.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(WorkspaceError, match="already exists") as err:
        export_merged(run.path, out, workspace, dtype="fp32")
    assert "overwrite" in err.value.hint.lower()
    with pytest.raises(WorkspaceError, match="not an earlier export"):   # never wipes a stranger
        export_merged(run.path, out, workspace, dtype="fp32", overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    first = export_merged(run.path, out, workspace, dtype="fp32", overwrite=True)   # empty: fine
    again = export_merged(run.path, out, workspace, dtype="fp32", overwrite=True)   # an export
    assert first.path == again.path == out.resolve() and (out / "config.json").is_file()


def test_disk_full_leaves_no_half_export(workspace, tiny_model_dir, monkeypatch):
    run, _ = make_run(workspace, tiny_model_dir("llama"), embed="off", head="off")

    def full(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    from transformers import PreTrainedModel
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    with pytest.raises(WorkspaceError, match="disk is full"):
        export_merged(run.id, None, workspace, dtype="fp32")
    assert not run.exports_dir.exists() or not any(run.exports_dir.iterdir())


def test_a_failed_check_keeps_nothing(workspace, tiny_model_dir, monkeypatch):
    run, _ = make_run(workspace, tiny_model_dir("llama"), embed="off", head="lora")
    import cpt_studio.engine.model.export as export

    real_save = export._save

    def corrupt(model, folder):               # a merge gone wrong: the saved head is off
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
        real_save(model, folder)

    monkeypatch.setattr(export, "_save", corrupt)
    with pytest.raises(CptError, match="does not match the adapter model") as err:
        export_merged(run.id, None, workspace, dtype="fp32")
    assert "not kept" in err.value.hint
    assert not any(run.exports_dir.iterdir())


def test_default_out_dir_outside_a_run(tmp_path):
    assert default_out_dir(tmp_path / "my-adapter", "fp16") == tmp_path / "my-adapter-merged-fp16"
