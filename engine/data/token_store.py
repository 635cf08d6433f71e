"""A corpus's token stream on disk, and training blocks read from it on demand (issue 14).

    writer = TokenFileWriter(cache_dir / f"{key}.train.tokens", vocab_size)
    writer.append(ids)                     # int array of one tokenizer batch, EOS included
    n_tokens = writer.finish()             # fsynced, then renamed into place
    blocks = TokenBlocks.open(path, seq_len, rows=None)      # rows=None: every block, in order
    blocks.shape                           # (n_rows, seq_len)
    blocks[torch.tensor([4, 1])]           # LongTensor [2, seq_len], read from the memory map
    blocks[:]                              # all rows (tests, small eval sets)

The stream is stored as uint16 when every id fits (vocabularies up to 65,536), else uint32: 2 or 4
bytes a token on disk, and only the rows a batch asks for in memory, so the worker's RAM does not
grow with the corpus. Block i is tokens[i * seq_len : (i + 1) * seq_len], exactly the blocks the
in-memory packer of PACKING_VERSION 1 cut; `rows` picks and orders the blocks of one split.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..atomic import fsync_dir


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class TokenFileWriter:
    """Appends token ids to `<path>.partial-<pid>`; `finish` makes it `<path>`, whole or not at all.

    Resumable: `checkpoint(position)` makes what was written so far durable and records it, with
    the caller's `position` (where its input stood), in `<partial>.json`. A writer of the same path
    that finds the partial file of a process that is gone (killed, or stopped through `suspend`)
    with such a record takes it over: the file is cut back to the recorded tokens and `resumed`
    holds that position (None when it starts from nothing). A partial without a record is removed.
    """

    def __init__(self, path: Path, vocab_size: int):
        self.path = Path(path)
        self.dtype = token_dtype(vocab_size)
        self.partial = self.path.with_name(self.path.name + f".partial-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.resumed, self.n_tokens = _take_over_partial(self.path, self.partial, self.dtype)
        if self.resumed is None:
            self._file = open(self.partial, "wb")
        else:
            self._file = open(self.partial, "r+b")
            self._file.truncate(self.n_tokens * self.dtype.itemsize)
            self._file.seek(0, os.SEEK_END)

    @property
    def record(self) -> Path:
        return _record_of(self.partial)

    def checkpoint(self, position: dict) -> None:
        """What was appended is on disk (fsynced) and `position` recorded beside it."""
        from ..atomic import write_bytes_atomic

        self._file.flush()
        os.fsync(self._file.fileno())
        write_bytes_atomic(self.record, json.dumps({"tokens": self.n_tokens, "dtype": self.dtype.name,
                                                    "position": position}).encode())

    def suspend(self) -> None:
        """Stop writing and leave the partial file and its last checkpoint for a later writer."""
        if not self._file.closed:
            self._file.close()
        if not self.record.is_file():
            self.partial.unlink(missing_ok=True)

    def append(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if int(ids.max()) > np.iinfo(self.dtype).max or int(ids.min()) < 0:
            raise ValueError(f"token id out of range for {self.dtype} (vocabulary size wrong?)")
        self._file.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.n_tokens += len(ids)

    def finish(self) -> int:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        self.record.unlink(missing_ok=True)
        return self.n_tokens

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.partial.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)


def _record_of(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _take_over_partial(path: Path, own: Path, dtype: np.dtype) -> tuple[Optional[dict], int]:
    """(position, tokens) of a gone writer's partial of `path` now renamed to `own`, or (None, 0).
    Partials of gone writers that cannot be resumed are removed; a live process's are left alone."""
    from ..runs.store import process_alive

    found: list[tuple[int, Path, dict]] = []
    for partial in path.parent.glob(path.name + ".partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and process_alive(int(pid))):
            continue                               # a record file, or a live writer's
        try:
            record = json.loads(_record_of(partial).read_text("utf-8"))
            tokens = int(record["tokens"])
            usable = (record.get("dtype") == dtype.name and isinstance(record.get("position"), dict)
                      and 0 <= tokens * dtype.itemsize <= partial.stat().st_size)
        except (OSError, ValueError, KeyError, TypeError):
            usable = False
        if usable:
            found.append((tokens, partial, record["position"]))
        else:
            partial.unlink(missing_ok=True)
            _record_of(partial).unlink(missing_ok=True)
    found.sort(key=lambda item: -item[0])          # the furthest one; the others go
    for _tokens, partial, _position in found[1:]:
        partial.unlink(missing_ok=True)
        _record_of(partial).unlink(missing_ok=True)
    if not found:
        return None, 0
    tokens, partial, position = found[0]
    try:
        if partial != own:
            os.replace(_record_of(partial), _record_of(own))
            os.replace(partial, own)
    except OSError:                                # another writer took it first
        return None, 0
    return position, tokens


class TokenBlocks:
    """Rows of [seq_len] tokens cut from a token file, read through a memory map.

    Indexing with an int, a slice, a list, a numpy array or a LongTensor of row numbers gives an
    int64 tensor; only those rows are read. `rows` maps row numbers to block numbers of the file.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, rows: Optional[np.ndarray] = None):
        n_blocks = len(tokens) // seq_len
        self._blocks = tokens[: n_blocks * seq_len].reshape(n_blocks, seq_len)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.seq_len = seq_len

    @classmethod
    def open(cls, path: Path, dtype: str | np.dtype, seq_len: int,
             rows: Optional[np.ndarray] = None) -> "TokenBlocks":
        size = Path(path).stat().st_size
        dtype = np.dtype(dtype)
        if size == 0:
            return cls(np.zeros(0, dtype), seq_len, rows)
        return cls(np.memmap(path, dtype=dtype, mode="r", shape=(size // dtype.itemsize,)), seq_len,
                   rows)

    @property
    def n_blocks(self) -> int:
        """Blocks in the whole file (every split), before `rows` picks some."""
        return self._blocks.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_blocks if self.rows is None else len(self.rows), self.seq_len)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        picked = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        if picked.ndim == 0:
            return self[picked.reshape(1)][0]
        if picked.size and (picked.min() < -len(self) or picked.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        blocks = picked if self.rows is None else self.rows[picked]
        return torch.from_numpy(np.asarray(self._blocks[blocks], dtype=np.int64))

    def with_rows(self, rows: np.ndarray) -> "TokenBlocks":
        """The same file, another split (rows are block numbers of the file)."""
        view = TokenBlocks.__new__(TokenBlocks)
        view._blocks, view.seq_len = self._blocks, self.seq_len
        view.rows = np.asarray(rows, dtype=np.int64)
        return view
