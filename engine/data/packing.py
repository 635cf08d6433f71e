"""Tokenize a corpus and pack it into fixed-length training blocks, with an eval split and a cache.

    data = build_packed_data(cfg.data, tokenizer, workspace.cache, progress=report, seed=42)
    data.train                   # TokenBlocks: shape (N, seq_len); data.train[indices] -> LongTensor
    data.eval_sets["heldout"]    # TokenBlocks (M, seq_len); "retention" too when configured
    data.stats                   # documents, tokens, train_blocks, eval_blocks, cache_hit, ...

Every document is tokenized without special tokens and followed by EOS; the documents of all
files form one stream that is cut into blocks of exactly seq_len (the remainder is dropped). The
stream goes to a token file in cache_dir as it is tokenized (token_store.py: uint16 or uint32, one
tokenizer batch in memory at a time) and training reads its blocks through a memory map, so the
worker's RAM does not grow with the corpus. A document longer than _PIECE_CHARS goes to the
tokenizer in pieces cut before whitespace (`document_pieces`): the tokenizer's memory follows the
text it is given, about 100 bytes a character; a .txt/.md file is read and cleaned a chunk at a
time (text_stream.py), so no size of file is ever held whole. The files are named by a hash of
the file contents, the data settings and the tokenizer, so a second run on the same corpus skips
tokenizing; they are the training data, not a mere cache: a full disk while writing them stops
the run with a message.
Tokenizing records a checkpoint at most every _CHECKPOINT_S seconds, and when it is stopped
(token_store.py): a run stopped or killed while tokenizing leaves its partial file, and the next
run on the same corpus and tokenizer goes on from the last checkpoint instead of from the start.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..atomic import file_sha256, write_bytes_atomic
from ..config import DataConfig
from .corpus import corpus_entry_files, corpus_size_bytes, expand_corpus_paths, read_document_parts
from ..errors import CorpusError, ModelSourceError, printable, write_error
from .text_stream import cut_pieces
from .token_store import TokenBlocks, TokenFileWriter, token_dtype

logger = logging.getLogger(__name__)

PACKING_VERSION = 2                 # bump when the packed output changes for the same inputs
                                    # (2: token files + memory map; the same blocks as 1)
_BATCH_DOCS = 256                   # documents per tokenizer call
_BATCH_CHARS = 1_000_000            # ... or this many characters, whichever comes first
_PIECE_CHARS = 100_000              # longer documents go to the tokenizer in pieces this long
_REPORT_STEP = 0.02                 # report progress at least every 2 %
_CHECKPOINT_S = 30.0                # a stopped or killed tokenizing loses at most this much work

Progress = Callable[[float, str], None]


@dataclass
class PackedData:
    """Packed token blocks ready for training and evaluation."""

    train: TokenBlocks                                    # (N, seq_len); [rows] -> int64 tensor
    eval_sets: dict = field(default_factory=dict)         # name -> TokenBlocks (M, seq_len)
    stats: dict = field(default_factory=dict)


def build_packed_data(data_cfg: DataConfig, tokenizer, cache_dir: Path,
                      progress: Optional[Progress] = None, seed: int = 0) -> PackedData:
    """Tokenize, pack and split the configured corpus, or load it from the cache.

    Args:
        data_cfg: files, text column, seq_len and eval settings.
        tokenizer: a transformers tokenizer with an EOS token.
        cache_dir: where the token files go (<key>.<split>.tokens, <key>.rows.npz, <key>.json).
        progress: called as progress(fraction 0..1, message) while tokenizing.
        seed: picks the held-out blocks when no eval_files are given.

    Raises:
        CorpusError: unreadable files, or a corpus too small for seq_len.
        ModelSourceError: the tokenizer has no EOS token.
        DiskFullError: no room in cache_dir for the token files.
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

    cache_dir = Path(cache_dir)
    total_bytes = sum(corpus_size_bytes(p) for paths in groups.values() for p in paths)
    tracker = _Tracker(report, total_bytes)
    vocab = _vocab_size(tokenizer)
    n_tokens, counts = _tokenize_to_file(groups["train"], tokenizer, eos, data_cfg.text_column,
                                         tracker, cache_dir / f"{key}.train.tokens", vocab)
    dtype = token_dtype(vocab)
    blocks = TokenBlocks.open(cache_dir / f"{key}.train.tokens", dtype, seq_len)
    n, dropped = blocks.n_blocks, n_tokens - blocks.n_blocks * seq_len
    if n < (1 if groups["heldout"] else 2):
        raise _too_small(groups["train"], n_tokens, seq_len, need=1 if groups["heldout"] else 2)
    rows: dict[str, np.ndarray] = {}
    if groups["heldout"]:
        train = blocks
        heldout = _eval_blocks("heldout", groups["heldout"], tokenizer, eos, data_cfg, tracker,
                               seed, cache_dir, key, vocab, rows)
    else:
        n_eval = min(max(1, round(data_cfg.eval_fraction * n)), data_cfg.max_eval_blocks, n - 1)
        is_eval = np.zeros(n, dtype=bool)
        is_eval[block_permutation(n, seed)[:n_eval]] = True
        rows["train"], rows["heldout"] = np.flatnonzero(~is_eval), np.flatnonzero(is_eval)
        train, heldout = blocks.with_rows(rows["train"]), blocks.with_rows(rows["heldout"])
    eval_sets = {"heldout": heldout}
    if groups["retention"]:
        eval_sets["retention"] = _eval_blocks("retention", groups["retention"], tokenizer, eos,
                                              data_cfg, tracker, seed, cache_dir, key, vocab, rows)
    stats = {"documents": counts["documents"], "tokens": n_tokens,
             "train_blocks": len(train), "eval_blocks": len(heldout),
             "characters": counts["characters"],
             # EOS is ours, not the text's: leave it out of the tokens-per-character ratio.
             "tokens_per_char": (n_tokens - counts["documents"]) / max(1, counts["characters"]),
             "cache_hit": False, "dropped_tokens": dropped, "seq_len": seq_len}
    if "retention" in eval_sets:
        stats["retention_blocks"] = len(eval_sets["retention"])
    _finish_cache(cache_dir, key, rows, stats, dtype)
    report(1.0, f"Tokenized {stats['documents']:,} documents into {stats['tokens']:,} tokens "
                f"({stats['train_blocks']} train + {stats['eval_blocks']} eval blocks)")
    return PackedData(train, eval_sets, stats)


# ---- tokenizing and packing ----------------------------------------------------------------
class _Tracker:
    """Turns bytes read (over every file of every group) into progress reports."""

    def __init__(self, report: Progress, total_bytes: int):
        self.report, self.total = report, max(1, total_bytes)
        self.done = 0          # bytes of finished files
        self.last, self.last_time = -1.0, 0.0
        self.fraction = 0.0
        self.start = time.monotonic()

    def rate_text(self, fraction: float, now: float) -> str:
        """" — 12.3 MB/s, 0:42 left" once a second of reading gives a rate, else ""."""
        elapsed = now - self.start
        if elapsed < 1.0 or fraction <= 0:
            return ""
        rate = fraction * self.total / elapsed
        left = int(elapsed * (1 - fraction) / fraction)
        return f" — {rate / 1e6:.1f} MB/s, {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left" \
            if left >= 3600 else f" — {rate / 1e6:.1f} MB/s, {left // 60}:{left % 60:02d} left"

    def update(self, file_size: int, read_in_file: int, message: str, new_file: bool = False):
        # Parquet sizes are compressed, so clamp: progress never runs past the file's share.
        fraction = min(0.999, (self.done + min(read_in_file, file_size)) / self.total)
        self.fraction = fraction
        # A new file is named when it starts, but at most twice a second: a folder of 100k small
        # files must not flood the GUI with events.
        now = time.monotonic()
        if fraction - self.last >= _REPORT_STEP or (new_file and now - self.last_time >= 0.5):
            self.last, self.last_time = fraction, now
            self.report(fraction, message + self.rate_text(fraction, now))


def _tokenize_to_file(paths: list[Path], tokenizer, eos: int, text_column: str, tracker: _Tracker,
                      out: Path, vocab: int) -> tuple[int, dict]:
    """Tokenize the files into one token file at `out` (EOS after every document), a batch of
    documents at a time; returns (tokens written, document counts). A stop (KeyboardInterrupt:
    the run's StopNow, Ctrl+C) or a kill leaves the partial file and its last checkpoint, and the
    next call with the same files and settings (the same `out`) goes on from there; any other
    failure leaves nothing at `out` or beside it."""
    writer = TokenFileWriter(out, vocab)
    try:
        counts = _tokenize(paths, tokenizer, eos, text_column, tracker, writer)
        return writer.finish(), counts
    except KeyboardInterrupt:
        writer.suspend()
        raise
    except BaseException as exc:
        error = write_error(exc, "the tokenized corpus", out.parent,
                            "start again (the corpus is tokenized again)") \
            if isinstance(exc, OSError) else None
        writer.discard()
        if error is None:
            raise
        raise error from exc


def _tokenize(paths: list[Path], tokenizer, eos: int, text_column: str, tracker: _Tracker,
              writer: TokenFileWriter) -> dict:
    """Append the token ids of the files (EOS after every document) to `writer`, a tokenizer batch
    at a time, with a checkpoint at most every _CHECKPOINT_S seconds; from where `writer.resumed`
    says when it took over a stopped writer's file. Returns the document counts."""
    at = writer.resumed or {"file": 0, "pieces": 0, "read": 0, "documents": 0, "characters": 0}
    done = [dict(at), writer.n_tokens]    # the last position that matches the tokens written
    try:
        return _tokenize_from(at, paths, tokenizer, eos, text_column, tracker, writer, done)
    except KeyboardInterrupt:             # a stop: keep everything written so far, if it is whole
        if done[1] == writer.n_tokens and writer.n_tokens:
            try:
                writer.checkpoint(done[0])
            except OSError:               # a full disk: the last periodic checkpoint stays
                pass
        raise


def _tokenize_from(at: dict, paths: list[Path], tokenizer, eos: int, text_column: str,
                   tracker: _Tracker, writer: TokenFileWriter, done: list) -> dict:
    counts = {"documents": at["documents"], "characters": at["characters"]}
    last_checkpoint = time.monotonic()
    for index, path in enumerate(paths):
        size = corpus_size_bytes(path)
        if index < at["file"]:
            tracker.done += size
            continue
        skip = at["pieces"] if index == at["file"] else 0
        read = at["read"] if index == at["file"] else 0
        pieces, batch, batch_chars = skip, [], 0
        message = f"Tokenizing {printable(path.name)}"
        if writer.resumed is not None and index == at["file"]:
            tracker.update(size, read, f"Resuming where tokenizing stopped "
                                       f"({writer.n_tokens:,} tokens kept)", new_file=True)
        else:
            tracker.update(size, 0, message, new_file=True)
        for piece in chain(islice(document_pieces(path, text_column), skip, None), [None]):
            if piece is not None:
                batch.append(piece)
                batch_chars += len(piece[0])
            if batch and (piece is None or len(batch) >= _BATCH_DOCS or batch_chars >= _BATCH_CHARS):
                writer.append(_encode(tokenizer, batch, eos))
                pieces += len(batch)
                counts["documents"] += sum(ends for _, ends in batch)
                counts["characters"] += batch_chars
                read += sum(len(text.encode("utf-8")) for text, _ in batch)
                done[:] = [{"file": index, "pieces": pieces, "read": read, **counts}, writer.n_tokens]
                tracker.update(size, read, message)
                batch, batch_chars = [], 0
                if time.monotonic() - last_checkpoint >= _CHECKPOINT_S:
                    writer.checkpoint(done[0])
                    last_checkpoint = time.monotonic()
        tracker.done += size
        if not read:
            logger.warning("Corpus file %s holds no text; skipped", printable(str(path)))
    return counts


def _vocab_size(tokenizer) -> int:
    """Ids run below this (added tokens included)."""
    return max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0),
               int(tokenizer.eos_token_id) + 1)


def document_pieces(path: Path, text_column: str = "", limit: int = _PIECE_CHARS):
    """(text, ends the document) pieces of every document of one corpus file, in order: a
    document of more than `limit` characters is cut before whitespace (text_stream.cut_pieces),
    and a .txt/.md file is read a chunk at a time, so no piece or read holds a whole large file."""
    for parts in read_document_parts(path, text_column):
        yield from cut_pieces(parts, limit)


def _encode(tokenizer, batch: list[tuple[str, bool]], eos: int) -> np.ndarray:
    """The ids of a batch of (text, ends the document) pieces, EOS after each document's last."""
    # verbose=False: documents longer than model_max_length are fine here, packing cuts them.
    ids = tokenizer([text for text, _ in batch], add_special_tokens=False,
                    return_attention_mask=False, verbose=False)["input_ids"]
    total = sum(len(x) for x in ids) + sum(ends for _, ends in batch)
    flat = chain.from_iterable(chain(x, (eos,) if ends else ()) for x, (_, ends) in zip(ids, batch))
    return np.fromiter(flat, dtype=np.int32, count=total)


def _eval_blocks(name: str, paths, tokenizer, eos, data_cfg: DataConfig, tracker: _Tracker,
                 seed: int, cache_dir: Path, key: str, vocab: int, rows: dict) -> TokenBlocks:
    """Pack separate eval files into their own token file; at most max_eval_blocks blocks, picked
    by the seed (their block numbers go to rows[name])."""
    out = cache_dir / f"{key}.{name}.tokens"
    n_tokens, _ = _tokenize_to_file(paths, tokenizer, eos, data_cfg.text_column, tracker, out, vocab)
    blocks = TokenBlocks.open(out, token_dtype(vocab), data_cfg.seq_len)
    if blocks.n_blocks == 0:
        raise _too_small(paths, n_tokens, data_cfg.seq_len, need=1)
    if blocks.n_blocks > data_cfg.max_eval_blocks:
        rows[name] = np.sort(block_permutation(blocks.n_blocks, seed)[: data_cfg.max_eval_blocks])
        return blocks.with_rows(rows[name])
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



_SPLITS = ("train", "heldout", "retention")


def _finish_cache(cache_dir: Path, key: str, rows: dict, stats: dict, dtype) -> None:
    """Write the split rows and, last, the meta file whose presence marks a complete entry."""
    meta = {"key": key, "packing_version": PACKING_VERSION, "stats": stats,
            "dtype": np.dtype(dtype).name}
    try:
        if rows:
            import io
            buffer = io.BytesIO()
            np.savez(buffer, **rows)
            write_bytes_atomic(cache_dir / f"{key}.rows.npz", buffer.getvalue())
        write_bytes_atomic(cache_dir / f"{key}.json", json.dumps(meta, indent=1).encode())
    except OSError as exc:     # the token files are whole: this run trains; the next tokenizes again
        logger.warning("Could not record the tokenized corpus in %s (%s); the next run tokenizes "
                       "it again", cache_dir, exc)


def _load_cache(cache_dir: Path, key: str, seq_len: int) -> Optional[PackedData]:
    meta_path = cache_dir / f"{key}.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        if meta.get("packing_version") != PACKING_VERSION or meta["key"] != key:
            raise ValueError("made by another version")
        stats = dict(meta["stats"], cache_hit=True)
        rows_path = cache_dir / f"{key}.rows.npz"
        rows = dict(np.load(rows_path)) if rows_path.is_file() else {}
        files = {name: cache_dir / f"{key}.{name}.tokens" for name in _SPLITS}
        train_file = TokenBlocks.open(files["train"], meta["dtype"], seq_len)
        if stats["tokens"] != train_file.n_blocks * seq_len + stats["dropped_tokens"]:
            raise ValueError("the train token file does not hold the tokens recorded")
        sets = {}
        for name in ("train", "heldout", "retention"):
            source = files[name] if files[name].is_file() and name != "train" else None
            if source is None and name not in rows:
                if name == "train":
                    sets[name] = train_file
                continue
            blocks = train_file if source is None else TokenBlocks.open(source, meta["dtype"], seq_len)
            sets[name] = blocks.with_rows(rows[name]) if name in rows else blocks
            if name in rows and len(rows[name]) and rows[name].max() >= blocks.n_blocks:
                raise ValueError(f"{name} rows past the end of its token file")
        if "heldout" not in sets or len(sets["train"]) != stats["train_blocks"] \
                or len(sets["heldout"]) != stats["eval_blocks"]:
            raise ValueError("contents do not match the key")
    except Exception as exc:   # any damage (truncated, foreign, hand-edited): rebuild, never fail
        logger.warning("Ignoring a damaged corpus cache entry %s (%s); tokenizing again",
                       meta_path, exc)
        return None
    train = sets.pop("train")
    return PackedData(train, sets, stats)
