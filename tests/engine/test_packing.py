"""Packing: EOS between documents, exact blocks, a deterministic eval split, and the cache."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from cpt_studio.engine.config import DataConfig
from cpt_studio.engine.errors import CorpusError
from cpt_studio.engine.data.packing import block_permutation, build_packed_data

# The corpus writer lives beside the corpus tests; load it by path so any pytest import mode works.
_spec = importlib.util.spec_from_file_location("_corpus_cases",
                                               Path(__file__).with_name("test_corpus.py"))
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
DOCS, FORMATS, write_corpus = _cases.DOCS, _cases.FORMATS, _cases.write_corpus

SEQ = 16


def cfg(files, **kw) -> DataConfig:
    kw.setdefault("seq_len", SEQ)
    return DataConfig(train_files=[str(f) for f in files], **kw)


def stream(tokenizer, docs) -> list[int]:
    out: list[int] = []
    for doc in docs:
        out += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_tokenizer):
    """The packed txt corpus, the reference every other format must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    corpus = write_corpus("txt", root / "txt")
    return build_packed_data(cfg([corpus]), tiny_tokenizer, root / "cache")


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "txt"])
def test_every_format_packs_into_the_same_blocks(tmp_path, tiny_tokenizer, reference, fmt):
    corpus = write_corpus(fmt, tmp_path / fmt)
    data = build_packed_data(cfg([corpus]), tiny_tokenizer, tmp_path / "c")
    assert torch.equal(data.train[:], reference.train[:])
    assert torch.equal(data.eval_sets["heldout"][:], reference.eval_sets["heldout"][:])
    assert data.stats["documents"] == 3 and data.stats["tokens"] == reference.stats["tokens"]


def test_blocks_are_the_eos_separated_stream_cut_into_seq_len(tmp_path, tiny_tokenizer):
    data = build_packed_data(cfg([write_corpus("jsonl", tmp_path)], eval_fraction=0.0),
                             tiny_tokenizer, tmp_path / "cache")
    expected = stream(tiny_tokenizer, DOCS)
    n_blocks = len(expected) // SEQ
    blocks = torch.cat([data.train[:], data.eval_sets["heldout"][:]])
    assert data.train[:].dtype == torch.int64 and blocks.shape[1] == SEQ
    assert blocks.shape[0] == n_blocks == data.stats["train_blocks"] + data.stats["eval_blocks"]
    # Train and eval rows together are the stream's blocks in some order: sort rows to compare.
    want = torch.tensor(expected[: n_blocks * SEQ]).view(n_blocks, SEQ)
    assert sorted(map(tuple, blocks.tolist())) == sorted(map(tuple, want.tolist()))
    assert expected.count(tiny_tokenizer.eos_token_id) == 3            # one EOS after each document
    assert data.stats["dropped_tokens"] == len(expected) - n_blocks * SEQ
    assert data.stats["tokens"] == len(expected) and data.stats["characters"] == sum(map(len, DOCS))


def test_eval_split_is_disjoint_deterministic_and_capped(tmp_path, tiny_tokenizer):
    # Increasing numbers: no two blocks of the stream are equal, so rows identify blocks.
    docs = [" ".join(str(1000 + 10 * i + j) for j in range(10)) for i in range(30)]
    corpus = write_corpus("jsonl", tmp_path, docs)
    config = cfg([corpus], eval_fraction=0.2, max_eval_blocks=64)
    a = build_packed_data(config, tiny_tokenizer, tmp_path / "c1", seed=1)
    b = build_packed_data(config, tiny_tokenizer, tmp_path / "c2", seed=1)
    c = build_packed_data(config, tiny_tokenizer, tmp_path / "c3", seed=2)
    n = a.stats["train_blocks"] + a.stats["eval_blocks"]
    assert a.stats["eval_blocks"] == max(1, round(0.2 * n))
    assert torch.equal(a.eval_sets["heldout"][:], b.eval_sets["heldout"][:])
    assert not torch.equal(a.eval_sets["heldout"][:], c.eval_sets["heldout"][:])
    train_rows = {tuple(r) for r in a.train[:].tolist()}
    eval_rows = {tuple(r) for r in a.eval_sets["heldout"][:].tolist()}
    assert len(train_rows) + len(eval_rows) == n and not train_rows & eval_rows
    capped = build_packed_data(cfg([corpus], eval_fraction=0.5, max_eval_blocks=2),
                               tiny_tokenizer, tmp_path / "c4")
    assert capped.stats["eval_blocks"] == 2
    assert sorted(block_permutation(50, 7).tolist()) == list(range(50))


def test_eval_and_retention_files_are_packed_separately(tmp_path, tiny_tokenizer):
    train = write_corpus("jsonl", tmp_path / "train", [f"Train text {i}." for i in range(20)])
    heldout = write_corpus("csv", tmp_path / "eval", [f"Held-out text {i}." for i in range(20)])
    retention = write_corpus("txt", tmp_path / "ret", [f"General text {i}." for i in range(20)])
    config = cfg([train], eval_files=[str(heldout)], retention_files=[str(retention)],
                 max_eval_blocks=3)
    data = build_packed_data(config, tiny_tokenizer, tmp_path / "cache")
    assert data.stats["train_blocks"] == len(stream(tiny_tokenizer, [f"Train text {i}." for i in
                                                                     range(20)])) // SEQ
    assert data.eval_sets["heldout"].shape == (3, SEQ)
    assert data.eval_sets["retention"].shape == (3, SEQ)


def test_second_build_is_a_cache_hit_and_a_content_change_is_not(tmp_path, tiny_tokenizer):
    corpus = write_corpus("txt", tmp_path / "corpus")
    config = cfg([corpus])
    reports: list[tuple[float, str]] = []
    first = build_packed_data(config, tiny_tokenizer, tmp_path / "cache",
                              progress=lambda f, m: reports.append((f, m)))
    assert not first.stats["cache_hit"] and reports[-1][0] == 1.0
    assert any("00.txt" in m for _, m in reports)
    reports.clear()
    second = build_packed_data(config, tiny_tokenizer, tmp_path / "cache",
                               progress=lambda f, m: reports.append((f, m)))
    assert second.stats["cache_hit"] and reports == [(1.0, reports[0][1])]
    assert torch.equal(first.train[:], second.train[:]) and second.train[:].dtype == torch.int64
    assert torch.equal(first.eval_sets["heldout"][:], second.eval_sets["heldout"][:])
    assert {k: v for k, v in first.stats.items() if k != "cache_hit"} == \
        {k: v for k, v in second.stats.items() if k != "cache_hit"}

    (corpus / "01.txt").write_text(DOCS[1].upper(), "utf-8")       # same size, new content
    third = build_packed_data(config, tiny_tokenizer, tmp_path / "cache")
    assert not third.stats["cache_hit"] and not torch.equal(third.train[:], first.train[:])


def test_a_corrupt_cache_file_is_rebuilt(tmp_path, tiny_tokenizer):
    config = cfg([write_corpus("txt", tmp_path / "corpus")])
    expected = build_packed_data(config, tiny_tokenizer, tmp_path / "cache").train[:]
    tokens = list((tmp_path / "cache").glob("*.tokens"))
    assert tokens
    for path in tokens:
        path.write_bytes(path.read_bytes()[:40])
    again = build_packed_data(config, tiny_tokenizer, tmp_path / "cache")
    assert not again.stats["cache_hit"] and torch.equal(again.train[:], expected)


def test_corpus_too_small_for_seq_len_names_tokens_and_block_size(tmp_path, tiny_tokenizer):
    corpus = write_corpus("txt", tmp_path / "tiny", ["Just a few words."])
    with pytest.raises(CorpusError) as info:
        build_packed_data(cfg([corpus], seq_len=512), tiny_tokenizer, tmp_path / "cache")
    message = str(info.value)
    n_tokens = len(stream(tiny_tokenizer, ["Just a few words."]))
    assert "00.txt" in message and f"{n_tokens} tokens" in message and "seq_len 512" in message
    assert "smaller seq_len" in message


def test_progress_is_reported_often_and_in_order(tmp_path, tiny_tokenizer, monkeypatch):
    import cpt_studio.engine.data.packing as packing

    monkeypatch.setattr(packing, "_BATCH_DOCS", 2)
    corpus = write_corpus("jsonl", tmp_path, [f"Line number {i} of the corpus." for i in range(60)])
    reports: list[float] = []
    build_packed_data(cfg([corpus]), tiny_tokenizer, tmp_path / "cache",
                      progress=lambda f, m: reports.append(f))
    # 30 tokenizer batches of ~1.8 % of the file each: a report at least every 2 %, in order,
    # ending at 1.0. The last step jumps: progress counts text bytes, JSON keys are not text.
    assert reports == sorted(reports) and reports[-1] == 1.0 and len(reports) >= 15
    assert max(b - a for a, b in zip(reports[:-2], reports[1:-1])) < 0.05


def test_empty_train_files_mean_the_sample_corpus(tmp_path, tiny_tokenizer):
    data = build_packed_data(DataConfig(seq_len=64), tiny_tokenizer, tmp_path / "cache")
    assert data.stats["documents"] >= 1 and data.train.shape[1] == 64


def test_tokenizing_reports_its_speed_and_time_left():
    from cpt_studio.engine.data.packing import _Tracker

    reports = []
    tracker = _Tracker(lambda fraction, message: reports.append(message), 100_000_000)
    tracker.start = 0.0
    assert tracker.rate_text(0.25, 0.5) == ""                   # under a second: no rate yet
    assert tracker.rate_text(0.25, 10.0) == " — 2.5 MB/s, 0:30 left"
    assert tracker.rate_text(0.01, 100.0) == " — 0.0 MB/s, 2:45:00 left"
    tracker.start = -10.0                                        # ten seconds ago
    tracker.update(100_000_000, 50_000_000, "Tokenizing big.txt")
    assert reports and reports[-1].startswith("Tokenizing big.txt — ") and reports[-1].endswith(" left")


def test_a_long_document_is_tokenized_in_pieces_into_the_same_ids(tmp_path, tiny_tokenizer):
    """A 2 GB one-line document would need ~200 GB inside the tokenizer: documents longer than
    _PIECE_CHARS go in pieces cut before whitespace, and a byte-level BPE gives the same ids."""
    import random

    from cpt_studio.engine.data.corpus import read_documents
    from cpt_studio.engine.data.packing import _PIECE_CHARS
    from cpt_studio.engine.data.text_stream import cut_pieces

    rng = random.Random(3)
    words = ["la", "rapida", "bruna", "vulpo", "saltas", "super", "hundo", "123", "ĉiuj", "?!"]
    spaces = [" ", " ", " ", "  ", "\n", "\n\n", " \n", "\t"]
    text = "".join(rng.choice(words) + rng.choice(spaces) for _ in range(90_000))
    assert len(text) > 3 * _PIECE_CHARS
    pieces = list(cut_pieces([text], _PIECE_CHARS))
    assert len(pieces) > 3 and "".join(p for p, _ in pieces) == text
    assert [ends for _, ends in pieces] == [False] * (len(pieces) - 1) + [True]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "long.txt").write_text(text, encoding="utf-8")
    data = build_packed_data(cfg([str(tmp_path / "corpus")], eval_fraction=0.5), tiny_tokenizer,
                             tmp_path / "cache")
    (doc,) = read_documents(tmp_path / "corpus" / "long.txt")          # as the reader cleans it
    whole = tiny_tokenizer(doc, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    blocks = torch.cat([data.train[:], data.eval_sets["heldout"][:]])
    assert data.stats["documents"] == 1 and data.stats["tokens"] == len(whole)
    assert sorted(map(tuple, blocks.tolist())) == sorted(
        tuple(whole[i:i + SEQ]) for i in range(0, len(whole) - SEQ + 1, SEQ))
