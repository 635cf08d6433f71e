"""Columnar corpus formats through pyarrow: .parquet files and Hugging Face dataset folders.

Split from corpus.py, which imports it only when one of these formats is read (pyarrow is heavy);
the pieces both share are in corpus_source.py.
Both stream in batches, so memory stays bounded however big the file is.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import CorpusError
from .corpus_source import CorpusSource, is_inside, pick_text_column, row_values

_ARROW_BATCH = 1024          # parquet / arrow rows per batch


def open_parquet(path: Path, text_column: str) -> CorpusSource:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(str(path))
    except (ValueError, OSError) as exc:     # ArrowInvalid is a ValueError
        raise CorpusError(f"Corpus file '{path}' is not a readable Parquet file ({exc})") from None
    column = _pick_arrow_column(path, table.schema_arrow, text_column)
    # iter_batches walks row groups, so memory stays bounded however big the file is.
    batches = table.iter_batches(batch_size=_ARROW_BATCH, columns=[column])
    return CorpusSource(table.schema_arrow.names, column, _arrow_values(path, batches, column))


def open_hf_dataset(folder: Path, text_column: str) -> CorpusSource:
    import pyarrow as pa

    files = _hf_arrow_files(folder)
    try:
        with pa.memory_map(str(files[0])) as source:
            schema = pa.ipc.open_stream(source).schema
    except (ValueError, OSError) as exc:
        raise CorpusError(f"Dataset file '{files[0]}' is not readable ({exc})",
                          "Save the dataset again with Dataset.save_to_disk.") from None
    column = _pick_arrow_column(folder, schema, text_column)

    def batches() -> Iterator:
        for file in files:
            # save_to_disk writes Arrow IPC *stream* shards; memory-mapping keeps RAM flat.
            with pa.memory_map(str(file)) as source:
                yield from (b.select([column]) for b in pa.ipc.open_stream(source))
    return CorpusSource(schema.names, column, _arrow_values(folder, batches(), column))


def _hf_arrow_files(root: Path) -> list[Path]:
    """The data files of a dataset folder (its train split for a DatasetDict), all inside it."""
    folder = root
    try:
        if (root / "dataset_dict.json").is_file():
            splits = json.loads((root / "dataset_dict.json").read_text("utf-8")).get("splits", [])
            if "train" not in splits and len(splits) != 1:
                raise CorpusError(f"Dataset folder '{root}' has no 'train' split (splits: "
                                  f"{', '.join(map(str, splits)) or 'none'})",
                                  "Pick one split's folder instead.")
            folder = root / str("train" if "train" in splits else splits[0])
        state = folder / "state.json"
        if state.is_file():
            shards = json.loads(state.read_text("utf-8"))["_data_files"]
            files = [folder / str(shard["filename"]) for shard in shards]
        else:
            files = sorted(folder.glob("*.arrow"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorpusError(f"Dataset folder '{root}' has an unreadable dataset_dict.json or "
                          f"state.json ({type(exc).__name__}: {exc})",
                          "Save the dataset again with Dataset.save_to_disk.") from None
    # state.json and dataset_dict.json are text anyone can edit: "../" must not reach files
    # beside the dataset (a link inside it that leads out counts the same).
    outside = [os.path.relpath(f, root) for f in [folder, *files] if not is_inside(f, root)]
    if outside:
        raise CorpusError(f"Dataset folder '{root}' lists data files outside itself "
                          f"({', '.join(outside)})",
                          "Save the dataset again with Dataset.save_to_disk, or pick a dataset "
                          "folder whose files are all inside it.")
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise CorpusError(f"Dataset folder '{folder}' lacks its data files "
                          f"({', '.join(missing) or 'no .arrow files'})",
                          "Save the dataset again with Dataset.save_to_disk.")
    return files


def _pick_arrow_column(path: Path, schema, given: str) -> str:
    import pyarrow as pa

    def holds_text(name: str) -> bool:
        kind = schema.field(name).type
        return pa.types.is_string(kind) or pa.types.is_large_string(kind) or \
            getattr(pa.types, "is_string_view", lambda _: False)(kind)
    return pick_text_column(path, list(schema.names), given, holds_text)


def _arrow_values(path: Path, batches: Iterable, column: str) -> Iterator:
    def rows() -> Iterator:
        for batch in batches:
            yield from ({column: v} for v in batch.column(0).to_pylist())
    try:
        yield from row_values(path, rows(), column)
    except (ValueError, OSError) as exc:     # a damaged row group or shard shows up mid-stream
        raise CorpusError(f"Corpus file '{path}' is damaged: reading column '{column}' failed "
                          f"({exc})") from None
