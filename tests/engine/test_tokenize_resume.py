"""Tokenizing that is stopped or killed goes on where its last checkpoint was, into the same
blocks as a run that was never interrupted."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpt_studio.engine.config import DataConfig
from cpt_studio.engine.data import packing
from cpt_studio.engine.data.packing import build_packed_data
from cpt_studio.engine.runs.control import StopNow

TESTS = Path(__file__).resolve().parents[1]
SEQ = 16


def make_corpus(folder: Path) -> Path:
    """8 .jsonl files of 60 short documents each."""
    rng = random.Random(7)
    words = ["la", "kato", "hundo", "domo", "rapida", "bruna", "saltas", "super", "estas", "kaj"]
    folder.mkdir()
    for i in range(8):
        rows = [{"text": " ".join(rng.choices(words, k=rng.randint(5, 40)))} for _ in range(60)]
        (folder / f"part{i}.jsonl").write_text("\n".join(map(json.dumps, rows)), encoding="utf-8")
    return folder


def everything(data) -> tuple:
    return (data.stats["documents"], data.stats["tokens"], data.stats["characters"],
            data.train[:].tolist(), data.eval_sets["heldout"][:].tolist())


@pytest.fixture
def small_batches(monkeypatch):
    """A checkpoint after every batch of 4 documents: many places to stop inside a file."""
    monkeypatch.setattr(packing, "_BATCH_DOCS", 4)
    monkeypatch.setattr(packing, "_CHECKPOINT_S", 0.0)


def stopped_at(fraction: float, tmp_path, tokenizer):
    """(config, the uninterrupted result, the cache of a run stopped past `fraction`)."""
    corpus = make_corpus(tmp_path / "corpus")
    cfg = DataConfig(train_files=[str(corpus)], seq_len=SEQ)
    whole = build_packed_data(cfg, tokenizer, tmp_path / "once")

    def stop(done, message):
        if done > fraction:
            raise StopNow(signal.SIGINT)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_packed_data(cfg, tokenizer, cache, progress=stop)
    return cfg, whole, cache


def test_a_stopped_tokenizing_resumes_into_the_same_blocks(tmp_path, tiny_tokenizer, small_batches):
    cfg, whole, cache = stopped_at(0.45, tmp_path, tiny_tokenizer)
    left = sorted(p.name for p in cache.iterdir())
    assert len(left) == 2 and left[0].endswith(f".partial-{os.getpid()}") and left[1].endswith(".json")

    reports = []
    again = build_packed_data(cfg, tiny_tokenizer, cache, progress=lambda f, m: reports.append((f, m)))
    resumed = [(f, m) for f, m in reports if m.startswith("Resuming where tokenizing stopped")]
    assert resumed and resumed[0][0] > 0.3, reports[:3]
    kept = int(resumed[0][1].split("(")[1].split(" ")[0].replace(",", ""))
    assert 0 < kept < whole.stats["tokens"]
    assert everything(again) == everything(whole)
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]


_KILLED_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from tiny_models import build_tiny_tokenizer
from cpt_studio.engine.config import DataConfig
from cpt_studio.engine.data import packing
packing._BATCH_DOCS, packing._CHECKPOINT_S = 4, 0.0
def report(fraction, message):
    print(f"{fraction:.3f}", flush=True)
    if fraction > 0.6:
        input()                 # wait here for the kill
packing.build_packed_data(DataConfig(train_files=[sys.argv[1]], seq_len=16), build_tiny_tokenizer(),
                          Path(sys.argv[2]), progress=report)
"""


def test_a_killed_tokenizing_resumes_into_the_same_blocks(tmp_path, tiny_tokenizer, small_batches):
    corpus = make_corpus(tmp_path / "corpus")
    cfg = DataConfig(train_files=[str(corpus)], seq_len=SEQ)
    whole = build_packed_data(cfg, tiny_tokenizer, tmp_path / "once")
    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-P", "-c", _KILLED_CHILD, str(corpus), str(cache),
                              str(TESTS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if float(line) > 0.6:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert any(".partial-" in p.name for p in cache.iterdir())

    reports = []
    again = build_packed_data(cfg, tiny_tokenizer, cache, progress=lambda f, m: reports.append((f, m)))
    assert any(m.startswith("Resuming where tokenizing stopped") and f > 0.5 for f, m in reports)
    assert everything(again) == everything(whole)
    assert torch.equal(again.train[:], whole.train[:])


def test_a_stop_keeps_what_was_tokenized_before_any_periodic_checkpoint(tmp_path, tiny_tokenizer,
                                                                        monkeypatch):
    monkeypatch.setattr(packing, "_BATCH_DOCS", 4)
    monkeypatch.setattr(packing, "_CHECKPOINT_S", 3600.0)       # none would come in this test
    cfg, whole, cache = stopped_at(0.6, tmp_path, tiny_tokenizer)
    reports = []
    again = build_packed_data(cfg, tiny_tokenizer, cache, progress=lambda f, m: reports.append((f, m)))
    assert any(m.startswith("Resuming where tokenizing stopped") and f > 0.55 for f, m in reports)
    assert everything(again) == everything(whole)


def test_a_damaged_checkpoint_record_starts_over(tmp_path, tiny_tokenizer, small_batches):
    cfg, whole, cache = stopped_at(0.3, tmp_path, tiny_tokenizer)
    record = next(p for p in cache.iterdir() if p.name.endswith(".json"))
    record.write_text("{not json")
    reports = []
    again = build_packed_data(cfg, tiny_tokenizer, cache, progress=lambda f, m: reports.append((f, m)))
    assert not any(m.startswith("Resuming") for _, m in reports)
    assert everything(again) == everything(whole)
