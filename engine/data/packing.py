"""Tokenize a corpus and pack it into fixed-length training blocks, with an eval split and a cache.

    data = build_packed_data(cfg.data, tokenizer, workspace.cache, progress=report, seed=42)
    data.train                   # LongTensor [N, seq_len]
    data.eval_sets["heldout"]    # LongTensor [M, seq_len]; "retention" too when configured
    data.stats                   # documents, tokens, train_blocks, eval_blocks, cache_hit, ...

Every document is tokenized without special tokens and followed by EOS; the documents of all
files form one stream that is cut into blocks of exactly seq_len (the remainder is dropped). The
result is cached under cache_dir by a hash of the file contents, the data settings and the
tokenizer, so a second run on the same corpus skips tokenizing.

Limitation: the whole token stream is held in memory as int32 (4 bytes per token), which suits
corpora up to a few hundred million tokens; ~1e9 tokens would want a streamed, memory-mapped
packer. Packing peaks at about PACKING_BYTES_PER_TOKEN bytes a token (the stream, its blocks, the
int64 tensor, the cache's copy), so tokenizing stops with a CorpusError as soon as the tokens read
so far, or those the whole corpus will give at the rate seen, cannot fit in the RAM available.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..atomic import file_sha256, write_bytes_atomic
from ..config import DataConfig
from .corpus import corpus_entry_files, corpus_size_bytes, expand_corpus_paths, read_documents
from ..errors import CorpusError, ModelSourceError, printable

logger = logging.getLogger(__name__)

PACKING_VERSION = 1                 # bump when the packed output changes for the same inputs
_BATCH_DOCS = 256                   # documents per tokenizer call
_BATCH_CHARS = 1_000_000            # ... or this many characters, whichever comes first
_REPORT_STEP = 0.02                 # report progress at least every 2 %

# Peak bytes a token while packing: int32 stream 4 + train blocks copied out of it 4 + the int64
# tensor 8 + the cache's int32 copy 4 + its serialized bytes 4.
PACKING_BYTES_PER_TOKEN = 24
_PROJECT_AFTER = 0.1                # project the corpus's tokens from the rate once 10 % is read

Progress = Callable[[float, str], None]


@dataclass
class PackedData:
    """Packed token blocks ready for training and evaluation."""

    train: torch.Tensor                                   # [N, seq_len] int64
    eval_sets: dict = field(default_factory=dict)         # name -> [M, seq_len] int64
    stats: dict = field(default_factory=dict)


def build_packed_data(data_cfg: DataConfig, tokenizer, cache_dir: Path,
                      progress: Optional[Progress] = None, seed: int = 0) -> PackedData:
    """Tokenize, pack and split the configured corpus, or load it from the cache.

    Args:
        data_cfg: files, text column, seq_len and eval settings.
        tokenizer: a transformers tokenizer with an EOS token.
        cache_dir: where packed results are cached (<key>.safetensors + <key>.json).
        progress: called as progress(fraction 0..1, message) while tokenizing.
        seed: picks the held-out blocks when no eval_files are given.

    Raises:
        CorpusError: unreadable files, or a corpus too small for seq_len.
        ModelSourceError: the tokenizer has no EOS token.
    """
    report = progress or (lambda fraction, message: None)
    seq_len = data_cfg.seq_len
    groups = {"train": expand_corpus_paths(data_cfg.train_files or [str(_sample_corpus())]),
              "heldout": expand_corpus_paths(data_cfg.eval_files),
              "retention": expand_corpus_paths(data_cfg.retention_files)}
    shared = {p.resolve() for p in groups["train"]} & {p.resolve() for p in groups["heldout"]}
    if shared:
        logger.warning("Eval files are also in the training corpus (%s): eval loss will look "
                       "better than it is", printable(", ".join(sorted(p.name for p in shared))))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelSourceError(f"Tokenizer '{tokenizer.name_or_path}' has no end-of-sequence token",
                               "Pick a model whose tokenizer defines eos_token.")
    key = cache_key(data_cfg, groups, tokenizer, seed)
    cached = _load_cache(Path(cache_dir), key, seq_len)
    if cached is not None:
        logger.info("Packed corpus found in cache (%s)", key[:12])
        report(1.0, f"Using the tokenized corpus from the cache "
                    f"({cached.stats['tokens']:,} tokens)")
        return cached

    total_bytes = sum(corpus_size_bytes(p) for paths in groups.values() for p in paths)
    tracker = _Tracker(report, total_bytes)
    tokens, counts = _tokenize(groups["train"], tokenizer, eos, data_cfg.text_column, tracker)
    blocks, dropped = _cut_blocks(tokens, seq_len)
    n = len(blocks)
    if n < (1 if groups["heldout"] else 2):
        raise _too_small(groups["train"], len(tokens), seq_len, need=1 if groups["heldout"] else 2)
    if groups["heldout"]:
        train = blocks
        heldout = _eval_blocks(groups["heldout"], tokenizer, eos, data_cfg, tracker, seed)
    else:
        n_eval = min(max(1, round(data_cfg.eval_fraction * n)), data_cfg.max_eval_blocks, n - 1)
        is_eval = np.zeros(n, dtype=bool)
        is_eval[block_permutation(n, seed)[:n_eval]] = True
        train, heldout = blocks[~is_eval], blocks[is_eval]
    eval_sets = {"heldout": heldout}
    if groups["retention"]:
        eval_sets["retention"] = _eval_blocks(groups["retention"], tokenizer, eos, data_cfg,
                                              tracker, seed)
    stats = {"documents": counts["documents"], "tokens": len(tokens),
             "train_blocks": len(train), "eval_blocks": len(heldout),
             "characters": counts["characters"],
             # EOS is ours, not the text's: leave it out of the tokens-per-character ratio.
             "tokens_per_char": (len(tokens) - counts["documents"]) / max(1, counts["characters"]),
             "cache_hit": False, "dropped_tokens": dropped, "seq_len": seq_len}
    if "retention" in eval_sets:
        stats["retention_blocks"] = len(eval_sets["retention"])
    as_long = {k: torch.from_numpy(v.astype(np.int64)) for k, v in eval_sets.items()}
    data = PackedData(torch.from_numpy(train.astype(np.int64)), as_long, stats)
    _save_cache(Path(cache_dir), key, data)
    report(1.0, f"Tokenized {stats['documents']:,} documents into {stats['tokens']:,} tokens "
                f"({stats['train_blocks']} train + {stats['eval_blocks']} eval blocks)")
    return data


# ---- tokenizing and packing ----------------------------------------------------------------
class _Tracker:
    """Turns bytes read (over every file of every group) into progress reports."""

    def __init__(self, report: Progress, total_bytes: int):
        self.report, self.total = report, max(1, total_bytes)
        self.done = 0          # bytes of finished files
        self.last, self.last_time = -1.0, 0.0
        self.fraction = 0.0
        self.tokens = 0        # tokens held so far, every group
        self.last_memory_check = -1.0

    def hold(self, tokens: int) -> None:
        """Count tokens now held in memory; refuse a corpus whose packing cannot fit in RAM."""
        self.tokens += tokens
        now = time.monotonic()
        if self.last_memory_check >= 0 and now - self.last_memory_check < 0.5:
            return
        self.last_memory_check = now
        import psutil

        held = self.tokens * 4
        free = psutil.virtual_memory().available + held     # the tokens held are ours already
        expected = self.tokens
        if self.fraction >= _PROJECT_AFTER:
            expected = int(self.tokens / self.fraction)
        if expected * PACKING_BYTES_PER_TOKEN > free:
            raise CorpusError(
                f"The corpus is too big to pack in the RAM available: {self.fraction:.0%} of its "
                f"{_gb(self.total)} gave {self.tokens:,} tokens, so about {expected:,} in all, "
                f"and packing needs {PACKING_BYTES_PER_TOKEN} bytes a token "
                f"({_gb(expected * PACKING_BYTES_PER_TOKEN)}); {_gb(free)} of RAM is available",
                "Train on fewer or smaller files (a large corpus can be split over runs that each "
                "continue from the previous run's adapter), or close other programs.")

    def update(self, file_size: int, read_in_file: int, message: str, new_file: bool = False):
        # Parquet sizes are compressed, so clamp: progress never runs past the file's share.
        fraction = min(0.999, (self.done + min(read_in_file, file_size)) / self.total)
        self.fraction = fraction
        # A new file is named when it starts, but at most twice a second: a folder of 100k small
        # files must not flood the GUI with events.
        now = time.monotonic()
        if fraction - self.last >= _REPORT_STEP or (new_file and now - self.last_time >= 0.5):
            self.last, self.last_time = fraction, now
            self.report(fraction, message)


def _tokenize(paths: list[Path], tokenizer, eos: int, text_column: str, tracker: _Tracker):
    """One int32 token stream for the files (EOS after every document) and document counts."""
    pieces: list[np.ndarray] = []
    counts = {"documents": 0, "characters": 0}
    for path in paths:
        size, read, batch, batch_chars = corpus_size_bytes(path), 0, [], 0
        message = f"Tokenizing {printable(path.name)}"
        tracker.update(size, 0, message, new_file=True)
        for doc in chain(read_documents(path, text_column), [None]):
            if doc is not None:
                batch.append(doc)
                batch_chars += len(doc)
            if batch and (doc is None or len(batch) >= _BATCH_DOCS or batch_chars >= _BATCH_CHARS):
                pieces.append(_encode(tokenizer, batch, eos))
                counts["documents"] += len(batch)
                counts["characters"] += batch_chars
                read += sum(len(d.encode("utf-8")) for d in batch)
                tracker.update(size, read, message)
                tracker.hold(len(pieces[-1]))
                batch, batch_chars = [], 0
        tracker.done += size
        if not read:
            logger.warning("Corpus file %s holds no text; skipped", printable(str(path)))
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int32)), counts


def _gb(n: float) -> str:
    return f"{n / 1024 ** 3:.1f} GB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.0f} MB"


def _encode(tokenizer, batch: list[str], eos: int) -> np.ndarray:
    # verbose=False: documents longer than model_max_length are fine here, packing cuts them.
    ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    total = sum(len(x) for x in ids) + len(ids)
    flat = chain.from_iterable(chain(x, (eos,)) for x in ids)
    return np.fromiter(flat, dtype=np.int32, count=total)


def _cut_blocks(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    n = len(tokens) // seq_len
    return tokens[: n * seq_len].reshape(n, seq_len), len(tokens) - n * seq_len


def _eval_blocks(paths, tokenizer, eos, data_cfg: DataConfig, tracker: _Tracker, seed: int):
    """Pack separate eval files; at most max_eval_blocks blocks, picked by the seed."""
    tokens, _ = _tokenize(paths, tokenizer, eos, data_cfg.text_column, tracker)
    blocks, _ = _cut_blocks(tokens, data_cfg.seq_len)
    if len(blocks) == 0:
        raise _too_small(paths, len(tokens), data_cfg.seq_len, need=1)
    if len(blocks) > data_cfg.max_eval_blocks:
        keep = np.sort(block_permutation(len(blocks), seed)[: data_cfg.max_eval_blocks])
        blocks = blocks[keep]
    return blocks


def block_permutation(n: int, seed: int) -> np.ndarray:
    """A fixed permutation of range(n) for a seed, the same on every platform and numpy version.

    Sorting by a splitmix64 hash of (seed, index) avoids depending on a library RNG whose stream
    may change between releases: a run resumed after an upgrade must hold out the same blocks.
    """
    mask = (1 << 64) - 1
    base = np.uint64((seed * 0x9E3779B97F4A7C15) & mask)
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + base
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.argsort(z, kind="stable")


def _too_small(paths: list[Path], n_tokens: int, seq_len: int, need: int) -> CorpusError:
    names = ", ".join(f"'{p}'" for p in paths[:3]) + (f" and {len(paths) - 3} more"
                                                      if len(paths) > 3 else "")
    purpose = "one to train and one to evaluate" if need == 2 else "at least one"
    return CorpusError(f"The corpus {names} is too small for seq_len {seq_len}: "
                       f"{n_tokens:,} tokens make {n_tokens // seq_len} block(s) of {seq_len} "
                       f"tokens; {need} needed ({purpose})",
                       "Use a smaller seq_len (data.seq_len) or add more text.")


def _sample_corpus() -> Path:
    from importlib.resources import files
    return Path(str(files("cpt_studio.resources") / "sample_corpus" / "esperanto"))


# ---- cache -------------------------------------------------------------------------------
def cache_key(data_cfg: DataConfig, groups: dict, tokenizer, seed: int) -> str:
    """sha256 over file names + contents, the data settings and the tokenizer's identity."""
    h = hashlib.sha256()
    settings = {"v": PACKING_VERSION, "text_column": data_cfg.text_column,
                "seq_len": data_cfg.seq_len, "eval_fraction": data_cfg.eval_fraction,
                "max_eval_blocks": data_cfg.max_eval_blocks, "seed": seed,
                "tokenizer": tokenizer_fingerprint(tokenizer)}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for role, paths in groups.items():
        for path in paths:
            for file in corpus_entry_files(path):
                # A name is bytes on disk, UTF-8 or not (os.fsencode: the same bytes as .encode()
                # for a UTF-8 name, so keys made before stay valid).
                name = os.fsencode(file.relative_to(path.parent))
                h.update(f"{role}|".encode() + name + f"|{file.stat().st_size}|".encode())
                h.update(file_sha256(file).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: name, vocab size, EOS, and the full tokenizer spec."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Padding/truncation are call-time settings that transformers may leave on the backend.
        spec.pop("padding", None)
        spec.pop("truncation", None)
        body = json.dumps(spec, sort_keys=True)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    ident = f"{tokenizer.name_or_path}|{len(tokenizer)}|{tokenizer.eos_token_id}|"
    return hashlib.sha256((ident + body).encode()).hexdigest()



def _save_cache(cache_dir: Path, key: str, data: PackedData) -> None:
    from safetensors.torch import save

    # int32 halves the file; ids always fit (vocabularies stay far below 2**31).
    tensors = {"train": data.train.to(torch.int32).contiguous()}
    tensors.update({f"eval/{k}": v.to(torch.int32).contiguous() for k, v in data.eval_sets.items()})
    meta = {"key": key, "packing_version": PACKING_VERSION, "stats": data.stats}
    try:
        write_bytes_atomic(cache_dir / f"{key}.safetensors", save(tensors))
        # The stats file is written second, so its presence marks a complete cache entry.
        write_bytes_atomic(cache_dir / f"{key}.json", json.dumps(meta, indent=1).encode())
    except OSError as exc:     # the cache only saves time: a full disk must not stop the run
        logger.warning("Could not cache the packed corpus in %s (%s)", cache_dir, exc)


def _load_cache(cache_dir: Path, key: str, seq_len: int) -> Optional[PackedData]:
    tensors_path, meta_path = cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json"
    if not (tensors_path.is_file() and meta_path.is_file()):
        return None
    from safetensors.torch import load_file

    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        tensors = load_file(str(tensors_path))
        train = tensors["train"].long()
        eval_sets = {k.removeprefix("eval/"): v.long() for k, v in tensors.items()
                     if k.startswith("eval/")}
        stats = dict(meta["stats"], cache_hit=True)
        shapes_ok = all(t.ndim == 2 and t.shape[1] == seq_len for t in [train, *eval_sets.values()])
        if meta["key"] != key or "heldout" not in eval_sets or not shapes_ok \
                or len(train) != stats["train_blocks"]:
            raise ValueError("contents do not match the key")
    except Exception as exc:   # any damage (truncated, foreign, hand-edited): rebuild, never fail
        logger.warning("Ignoring a damaged corpus cache entry %s (%s); tokenizing again",
                       tensors_path, exc)
        return None
    return PackedData(train, eval_sets, stats)
