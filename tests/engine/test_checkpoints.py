"""Checkpoints: exact save/restore, keep-last, and damaged or half-written checkpoints never resumed."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_studio.engine.runs.checkpoints import (is_checkpoint, latest_checkpoint, list_checkpoints,
                                           load_checkpoint, save_checkpoint, verify_checkpoint)
from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.errors import CheckpointError
from cpt_studio.engine.runs.store import Workspace


def build(seed: int = 0):
    """A tiny LoRA'd Llama with full trainable embeddings, its AdamW and a warmup schedule."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=["embed_tokens", "lm_head"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def trained():
    model, optimizer, scheduler = build()
    train_steps(model, optimizer, scheduler, 2)
    return model, optimizer, scheduler


@pytest.fixture
def run(tmp_path):
    return Workspace(tmp_path / "ws").create_run(RunConfig(name="ckpt"))


def save(run, trained, step, keep_last=3):
    return save_checkpoint(run, step, *trained, {"step": step, "tokens_seen": 16 * step}, keep_last=keep_last)


def test_save_then_load_restores_everything_bit_for_bit(run, trained):
    model, optimizer, scheduler = trained
    path = save(run, trained, 2)
    assert path == run.checkpoints_dir / "step-2" and is_checkpoint(path)
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng.pt",
            "trainer_state.json", "manifest.json"} <= {p.name for p in path.iterdir()}
    expected_draws = (torch.rand(4), random.random(), np.random.rand())

    fresh, fresh_opt, fresh_sched = build(seed=1)       # different init: nothing matches by chance
    torch.rand(7), random.random(), np.random.rand()    # move every RNG on
    state = load_checkpoint(path, fresh, fresh_opt, fresh_sched)

    assert state == {"step": 2, "tokens_seen": 32}
    assert (torch.rand(4), random.random(), np.random.rand()) == (
        pytest.approx(expected_draws[0]), expected_draws[1], expected_draws[2])
    trained_params = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        if param.requires_grad or "modules_to_save" in name:
            assert torch.equal(param, trained_params[name]), name
    assert fresh.base_model.model.model.embed_tokens.modules_to_save["default"].weight.requires_grad
    a, b = optimizer.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key, st in a["state"].items():
        assert all(torch.equal(st[k], b["state"][key][k]) for k in st)
    assert fresh_sched.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"] == 2
    assert fresh_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_training_on_after_restore_matches_training_without_a_break(run):
    straight = build()
    train_steps(*straight, 2)
    path = save(run, straight, 2)
    train_steps(*straight, 1)

    resumed = build()                  # the same frozen base, as when loaded from disk again
    torch.rand(3), random.random()     # the RNG moved on in the meantime
    load_checkpoint(path, *resumed)
    train_steps(*resumed, 1)
    for (name, p), (_, q) in zip(straight[0].named_parameters(), resumed[0].named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), name


def test_keep_last_deletes_the_oldest(run, trained):
    for step in (10, 20, 30, 40):
        save(run, trained, step, keep_last=2)
    assert [p.name for p in list_checkpoints(run)] == ["step-30", "step-40"]
    assert latest_checkpoint(run).name == "step-40"


def test_resume_from_an_earlier_step_drops_the_abandoned_later_ones(run, trained):
    for step in (10, 20, 30):
        save(run, trained, step, keep_last=5)
    save(run, trained, 15, keep_last=5)          # went on from step-10 after a bad stretch
    assert [p.name for p in list_checkpoints(run)] == ["step-10", "step-15"]


def test_corrupt_checkpoint_is_rejected_and_skipped(run, trained):
    save(run, trained, 1)
    newest = save(run, trained, 2)
    weights = newest / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF                  # same size, flipped bits: only sha256 sees it
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is corrupt"):
        verify_checkpoint(newest)
    with pytest.raises(CheckpointError):
        load_checkpoint(newest, build()[0])
    (newest / "optimizer.pt").write_bytes(b"short")   # a truncated file: the quick size check sees it
    assert latest_checkpoint(run).name == "step-1"
    missing = save(run, trained, 3)
    (missing / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt is missing"):
        verify_checkpoint(missing)
    assert latest_checkpoint(run).name == "step-1"


def test_half_written_checkpoint_is_never_returned_and_is_cleaned(run, trained):
    good = save(run, trained, 1)
    # A worker killed while writing step 2: a temp folder of a dead pid with some of the files.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = run.checkpoints_dir / f".step-2.tmp-{dead.pid}-abc123"
    shutil.copytree(good, leftover)
    (leftover / "manifest.json").unlink()
    # A step folder without a manifest (copied by hand, say) does not count either.
    shutil.copytree(leftover, run.checkpoints_dir / "step-3")
    assert latest_checkpoint(run) == good
    assert [p.name for p in list_checkpoints(run)] == ["step-1"]
    assert not leftover.exists()


def test_temp_folder_of_a_live_writer_is_left_alone(run, trained):
    live = run.checkpoints_dir / ".step-9.tmp-1-abc"  # pid 1 is always alive
    live.mkdir(parents=True)
    assert latest_checkpoint(run) is None
    assert live.exists()


@pytest.mark.parametrize("rank, modules_to_save, field", [
    (8, ["embed_tokens", "lm_head"], "r is 4"),
    # Without this check the full embedding copies would load silently into the frozen base.
    (4, None, "modules_to_save"),
])
def test_checkpoint_of_other_adapter_settings_is_refused(run, trained, rank, modules_to_save, field):
    path = save(run, trained, 1)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    other = get_peft_model(base, LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            modules_to_save=modules_to_save))
    embeddings = base.model.embed_tokens.weight.detach().clone()
    with pytest.raises(CheckpointError, match=field) as info:
        load_checkpoint(path, other)
    assert "adapter_config.json" in info.value.message and info.value.hint
    assert torch.equal(base.model.embed_tokens.weight, embeddings)


def test_manifest_lists_every_file_with_its_hash(run, trained):
    path = save(run, trained, 4)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 4
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
    assert verify_checkpoint(path)["files"]["rng.pt"]["size"] == (path / "rng.pt").stat().st_size


def test_failed_write_leaves_no_trace_and_says_why(run, trained, monkeypatch):
    save(run, trained, 1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        save(run, trained, 2)
    assert "disk space" in info.value.hint
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step-1"]
