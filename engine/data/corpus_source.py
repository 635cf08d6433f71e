"""What every corpus reader hands back, and the two rules they share: which column holds the
text, and that each record's text is a string.

    column = pick_text_column(path, ["id", "content"], given="", holds_text=lambda c: True)
    source = CorpusSource(["id", "content"], column, row_values(path, rows, column))

corpus.py (text, JSON, CSV) and corpus_arrow.py (Parquet, dataset folders) both build on this;
neither imports the other at module level, so pyarrow stays unimported until a columnar file is read.
`is_inside` is the one test of "does this path stay in the folder the user chose" that both use.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from ..errors import CorpusError

logger = logging.getLogger(__name__)

TEXT_COLUMN_NAMES = ("text", "content", "body", "document", "article", "raw", "passage")


class CorpusSource(NamedTuple):
    """An opened corpus file: its columns, the text column read, and that column's raw values."""

    columns: list
    column: str
    values: Iterator      # raw values of the text column (str or None), before cleaning
    whole_file: bool = False   # .txt/.md: the file is one document, streamed by the reader itself


def row_values(path: Path, rows: Iterable, column: str | None) -> Iterator:
    """The text of each row: the row itself (column None) or its column; non-text is an error."""
    where = f"column '{column}'" if column is not None else "the list"
    for index, row in enumerate(rows):
        value = row.get(column) if column is not None and isinstance(row, dict) else row
        if value is not None and not isinstance(value, str):
            raise CorpusError(f"Corpus file '{path}', record {index + 1}: expected text in "
                              f"{where}, found a {type(value).__name__}",
                              "Every record must hold its text as a string.")
        yield value


def pick_text_column(path: Path, columns: list, given: str, holds_text) -> str:
    """The given column (checked), else the first preferred name, else the first text column."""
    if given:
        if given not in columns:
            raise CorpusError(f"Corpus file '{path}' has no column '{given}' (columns: "
                              f"{', '.join(map(str, columns)) or 'none'})",
                              "Set the text column to one of the listed columns, or leave it "
                              "empty to detect it.")
        return given
    lowered = {str(c).lower(): c for c in reversed(columns)}
    for name in TEXT_COLUMN_NAMES:
        if name in lowered:
            return lowered[name]
    for column in columns:
        if holds_text(column):
            logger.debug("%s: no column named like text; reading %r, the first text column",
                         path, column)
            return column
    raise CorpusError(f"Corpus file '{path}' has no column holding text (columns: "
                      f"{', '.join(map(str, columns)) or 'none'})",
                      "Set the text column to the one that holds the documents.")


def is_inside(path: Path, folder: Path) -> bool:
    """True when `path`, every link in it followed, lies in `folder` (or is `folder` itself)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)
