"""The token store (engine/data/token_store.py): blocks read from a memory-mapped token file, and a
worker whose RAM does not grow with the corpus (issue 14)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpt_studio.engine.data.token_store import TokenBlocks, TokenFileWriter, token_dtype

TESTS = Path(__file__).resolve().parents[1]


def written(tmp_path, ids, vocab=320, name="t.tokens") -> Path:
    writer = TokenFileWriter(tmp_path / name, vocab)
    for start in range(0, len(ids), 7):                 # several appends, as batches come
        writer.append(np.asarray(ids[start:start + 7], dtype=np.int32))
    assert writer.finish() == len(ids)
    return tmp_path / name


def test_the_smallest_type_that_holds_the_vocabulary():
    assert token_dtype(320) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(151_936) == np.uint32   # Qwen


def test_blocks_are_the_stream_cut_into_rows_and_indexed_like_a_tensor(tmp_path):
    ids = list(range(1, 48))                                # 47 tokens: 5 blocks of 9, 2 dropped
    path = written(tmp_path, ids)
    assert path.stat().st_size == 47 * 2                    # uint16 on disk
    blocks = TokenBlocks.open(path, "uint16", 9)
    reference = torch.tensor(ids[:45]).reshape(5, 9)
    assert blocks.shape == (5, 9) and len(blocks) == 5
    assert torch.equal(blocks[:], reference) and blocks[:].dtype == torch.int64
    assert torch.equal(blocks[torch.tensor([4, 0, 4])], reference[[4, 0, 4]])
    assert torch.equal(blocks[np.array([2])], reference[[2]])
    assert torch.equal(blocks[1], reference[1]) and torch.equal(blocks[-1], reference[-1])
    assert torch.equal(blocks[1:3], reference[1:3])
    split = blocks.with_rows(np.array([3, 1]))
    assert split.shape == (2, 9) and torch.equal(split[:], reference[[3, 1]])
    assert torch.equal(split[torch.tensor([1])], reference[[1]])
    with pytest.raises(IndexError):
        split[2]


def test_ids_above_65535_are_stored_in_four_bytes(tmp_path):
    ids = [5, 70_000, 151_000, 3]
    path = written(tmp_path, ids, vocab=151_936)
    assert path.stat().st_size == 16
    assert TokenBlocks.open(path, token_dtype(151_936), 2)[:].tolist() == [[5, 70_000], [151_000, 3]]


def test_an_id_the_type_cannot_hold_is_refused_not_wrapped(tmp_path):
    writer = TokenFileWriter(tmp_path / "t.tokens", 320)
    with pytest.raises(ValueError, match="out of range"):
        writer.append(np.array([1, 70_000], dtype=np.int32))
    writer.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_partial_file_is_removed_by_the_next_writer(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f"t.tokens.partial-{dead}").write_bytes(b"\0" * 10)
    (tmp_path / "t.tokens.partial-1").write_bytes(b"\0" * 10)     # pid 1 is alive: kept
    written(tmp_path, [1, 2, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.tokens", "t.tokens.partial-1"]


_BUILD = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from tiny_models import build_tiny_tokenizer
from cpt_studio.engine.config import DataConfig
from cpt_studio.engine.data.packing import build_packed_data
data = build_packed_data(DataConfig(train_files=[sys.argv[1]], seq_len=64), build_tiny_tokenizer(),
                         Path(sys.argv[2]))
data.train[list(range(0, len(data.train), 97))]         # rows from all over the map
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tokens": data.stats["tokens"]}))
"""


def _peak_rss_mb(tmp_path, n_files: int, one_document: bool = False) -> tuple[float, int]:
    rng = random.Random(n_files)
    words = ["vorto", "lingvo", "domo", "kato", "hundo", "rapida", "bruna", "saltas", "super",
             "maldiligenta", "homoj", "estas", "liberaj", "kaj", "egalaj", "digno", "rajtoj"]
    folder = tmp_path / f"corpus{n_files}{'-one' if one_document else ''}"
    folder.mkdir()
    texts = []
    for i in range(n_files):            # 1 MB each, paragraphs of random words
        text = "\n\n".join(" ".join(rng.choices(words, k=120)) for _ in range(1200))
        texts.append(text[: 1 << 20])
    if one_document:                    # a .txt file is one document
        (folder / "all.txt").write_text("\n\n".join(texts), encoding="utf-8")
    else:
        for i, text in enumerate(texts):
            (folder / f"{i}.txt").write_text(text, encoding="utf-8")
    done = subprocess.run([sys.executable, "-P", "-c", _BUILD, str(folder), str(tmp_path / "cache"),
                           str(TESTS)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    return result["rss_mb"], result["tokens"]


@pytest.mark.slow
def test_the_workers_memory_does_not_grow_with_the_corpus(tmp_path):
    """4 MB and 24 MB of text: the in-memory packer of PACKING_VERSION 1 held ~24 bytes a token
    (about 500 MB more for the larger corpus here); the token store holds one tokenizer batch."""
    small_mb, small_tokens = _peak_rss_mb(tmp_path, 4)
    large_mb, large_tokens = _peak_rss_mb(tmp_path, 24)
    assert large_tokens > 5 * small_tokens
    grown = large_mb - small_mb
    print(f"peak RSS {small_mb:.0f} MB for {small_tokens:,} tokens, {large_mb:.0f} MB for "
          f"{large_tokens:,} tokens (+{grown:.0f} MB)")
    assert grown < 50, f"peak RSS grew by {grown:.0f} MB for {large_tokens - small_tokens:,} more tokens"


@pytest.mark.slow
def test_one_long_document_costs_the_tokenizer_a_piece_not_the_document(tmp_path):
    """One 4 MB and one 24 MB document: a tokenizer given a whole document needs ~100 bytes a
    character (about 2 GB more here); given pieces of _PIECE_CHARS, a constant. The reader streams
    the file (text_stream.py), so nothing grows with the document (measured on this 2-core
    machine: +10 MB)."""
    small_mb, small_tokens = _peak_rss_mb(tmp_path, 4, one_document=True)
    large_mb, large_tokens = _peak_rss_mb(tmp_path, 24, one_document=True)
    assert large_tokens > 5 * small_tokens
    grown = large_mb - small_mb
    print(f"peak RSS {small_mb:.0f} MB -> {large_mb:.0f} MB (+{grown:.0f} MB) for one document "
          f"of {small_tokens:,} -> {large_tokens:,} tokens")
    assert grown < 50, f"peak RSS grew by {grown:.0f} MB for 20 MB more text in one document"
