"""Checkpoints: exact save/restore, keep-last, and damaged or half-written checkpoints never resumed."""
from __future__ import annotations

import errno
import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft import peft_model
from safetensors import SafetensorError
from transformers import LlamaConfig, LlamaForCausalLM

from cpt_studio.engine.runs.checkpoints import (choose_checkpoint, clean_temp_folders, is_checkpoint,
                                           latest_checkpoint, list_checkpoints, load_checkpoint,
                                           save_checkpoint, verify_checkpoint)
from cpt_studio.engine.config import RunConfig
from cpt_studio.engine.errors import CheckpointError, DiskFullError
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
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskFullError, match="checkpoint step-2 .*no space left on device") as info:
        save(run, trained, 2)
    assert f"Free space at {run.checkpoints_dir}" in info.value.hint
    assert "it goes on from step-1" in info.value.hint
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step-1"]


def _safetensors_disk_full(*args, **kwargs):
    """What safetensors raises when the disk fills while it writes (its text, verbatim)."""
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_while_the_weights_are_written_is_a_clean_error(run, trained, monkeypatch):
    """peft writes the weights through safetensors, whose error is no OSError: it used to escape
    as a crash. Now: our error naming the folder, the temp folder gone, step-1 intact."""
    first = save(run, trained, 1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    monkeypatch.setattr(peft_model, "safe_save_file", _safetensors_disk_full)
    with pytest.raises(DiskFullError) as info:
        save(run, trained, 2)
    assert str(run.checkpoints_dir) in info.value.message
    assert info.value.kind == "disk_full" and "goes on from step-1" in info.value.hint
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step-1"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert choose_checkpoint(run).path == first


def test_a_full_disk_at_the_first_checkpoint_never_speaks_of_a_last_one(run, trained, monkeypatch):
    monkeypatch.setattr(peft_model, "safe_save_file", _safetensors_disk_full)
    with pytest.raises(DiskFullError) as info:
        save(run, trained, 1)
    assert "no checkpoint yet, so it starts again from the beginning" in info.value.hint
    assert "last checkpoint" not in info.value.hint and "goes on from" not in info.value.hint
    assert list(run.checkpoints_dir.iterdir()) == []


def _flip_a_byte(path):
    """Damage a file without changing its size: only its sha256 can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_chooses_by_content_and_says_what_it_passed_over(run, trained):
    first, second = save(run, trained, 1), save(run, trained, 2)
    _flip_a_byte(second / "adapter_model.safetensors")
    assert latest_checkpoint(run) == second          # the quick listing compares sizes only
    choice = choose_checkpoint(run)
    assert choice.path == first and choice.step == 1
    assert [name for name, _ in choice.skipped] == ["step-2"]
    notes = choice.notes()
    assert notes[0].startswith("Checkpoint step-2 is damaged: ")
    assert "adapter_model.safetensors is corrupt" in notes[0]
    assert notes[-1] == "Resuming from step-1 instead, the newest intact checkpoint."
    assert choose_checkpoint(run, None).notes() == notes
    assert choose_checkpoint(Workspace(run.path.parent.parent).create_run(RunConfig(name="new"))).path is None


def test_an_explicit_checkpoint_is_taken_or_refused_naming_the_others(run, trained):
    first, second, third = (save(run, trained, step) for step in (1, 2, 3))
    for wanted in ("step-2", "2", 2, str(second)):
        choice = choose_checkpoint(run, wanted)
        assert choice.path == second and choice.explicit and choice.notes() == []
    with pytest.raises(CheckpointError, match="has no checkpoint step-7") as info:
        choose_checkpoint(run, "step-7")
    assert "step-1, step-2, step-3" in info.value.hint and "--checkpoint step-3" in info.value.hint
    _flip_a_byte(third / "optimizer.pt")
    with pytest.raises(CheckpointError, match="step-3 .* is damaged: .*optimizer.pt is corrupt") as info:
        choose_checkpoint(run, "step-3")
    assert "step-1, step-2." in info.value.hint and "step-3" not in info.value.hint
    with pytest.raises(CheckpointError, match="not a checkpoint of run"):
        choose_checkpoint(run, str(run.path.parent / "other" / "checkpoints" / "step-2"))


def test_when_every_checkpoint_is_damaged_resume_refuses_listing_them(run, trained):
    for path in (save(run, trained, 1), save(run, trained, 2)):
        _flip_a_byte(path / "rng.pt")
    with pytest.raises(CheckpointError, match="No checkpoint of run .* is intact: step-2: .*; step-1: "):
        choose_checkpoint(run)


def test_a_replace_killed_between_its_renames_gets_its_checkpoint_back(run, trained):
    """publish_dir_atomic moves step-N aside as .step-N.old before the new one takes its name; a
    writer killed in between left the only copy there. The next writer puts it back."""
    path = save(run, trained, 1)
    old = run.checkpoints_dir / ".step-1.old"
    path.rename(old)
    assert latest_checkpoint(run) is None and old.exists()   # a reader leaves it alone
    clean_temp_folders(run.checkpoints_dir, writer=True)
    assert choose_checkpoint(run).path == path and not old.exists()
