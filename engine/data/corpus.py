"""Corpus reading: turn files and folders of raw text into a stream of clean documents.

    paths = expand_corpus_paths(["notes/", "extra.jsonl"])
    for path in paths:
        for doc in read_documents(path):            # str, cleaned, never empty
            ...
    info = inspect_corpus_file(paths[0])             # columns, counts, preview for the GUI

Formats: .txt/.md (one document per file), .jsonl (one per line), .json (a list of objects or
strings, or an object holding one such list), .csv, .parquet, and Hugging Face dataset folders
(written by `Dataset.save_to_disk`; a DatasetDict folder gives its "train" split). The same text
yields the same documents in every format. Every problem a user can cause is a CorpusError that
names the file.

Memory does not follow file size: a .txt/.md file is read, cleaned and handed on 1 MiB at a time
(text_stream.py, `read_document_parts`), .jsonl and .csv a line at a time, a .json file over 64 MiB
a record at a time (json_stream.py), .parquet and dataset folders a batch of rows at a time. A single
record of the row formats is held whole.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import CorpusError, printable
from .corpus_source import CorpusSource, is_inside, pick_text_column, row_values
from . import json_stream
from .text_stream import clean_chunks, utf8_chunks

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".csv", ".parquet")
HF_DATASET_FORMAT = "hf_dataset"
_SNIFF_BYTES = 8192          # NUL bytes in this prefix mark a binary file
_PEEK_ROWS = 20              # rows looked at to find the text column of jsonl/csv
_UTF8_HINT = "Re-save the file as UTF-8 (most editors offer an encoding choice under 'Save as')."


@dataclass
class CorpusFileInfo:
    """What the GUI shows about one corpus file before training (no tokenization)."""

    path: Path
    format: str
    size_bytes: int
    columns: list = field(default_factory=list)   # [] for txt/md and lists of strings
    text_column: str = ""                          # the column read (given or detected)
    documents: int = 0
    characters: int = 0
    preview: str = ""                              # the start of the first document
    error: str = ""                                # the CorpusError message, "" when readable


# ---- paths ---------------------------------------------------------------------------------
def is_hf_dataset_dir(path: Path) -> bool:
    """True for a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file():
        return True
    has_meta = (path / "state.json").is_file() or (path / "dataset_info.json").is_file()
    return has_meta and any(path.glob("*.arrow"))


def corpus_format(path: Path) -> str:
    """The format of a corpus path: "txt" ... "parquet" or "hf_dataset"; CorpusError if none."""
    path = Path(path)
    if path.is_dir():
        if is_hf_dataset_dir(path):
            return HF_DATASET_FORMAT
        raise CorpusError(f"'{path}' is a folder, not a corpus file",
                          "Give the folder to the corpus list; its files are picked up one by one.")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise CorpusError(f"Corpus file '{path}' has an unsupported type "
                          f"('{suffix or 'no suffix'}')",
                          f"Supported: {', '.join(SUPPORTED_SUFFIXES)}, or a Hugging Face dataset "
                          "folder. Convert the file or remove it from the corpus.")
    return suffix[1:]


def expand_corpus_paths(paths: list[str]) -> list[Path]:
    """Resolve files and folders into the corpus files to read, in a stable order.

    Folders are walked recursively in sorted order; hidden entries are skipped; a Hugging Face
    dataset folder counts as one entry. Duplicates (a file also reached through its folder, or
    through a link) are kept once, at their first place in that order.

    Links inside a chosen folder, and what is not a plain file, follow one rule: the walk never
    leaves the folder and never loops (see `walk_folder`). A link to a file inside the folder is
    read like that file (once, however many links point at it); a link to a file outside it, a
    link to any folder, a broken link, a pipe, socket or device file are skipped with a logged
    note, and a folder left with nothing to read says what it skipped. A file named directly in
    the list is the user's own choice and is read wherever its links lead, if it is a plain file.
    """
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise CorpusError(f"Corpus path '{path}' does not exist",
                              "Check the path, or remove it from the corpus list.")
        if path.is_dir() and not is_hf_dataset_dir(path):
            out.extend(_corpus_files_of_folder(path))
        else:
            corpus_format(path)          # raises for an unsupported suffix
            if not path.is_dir() and not path.is_file():
                raise _not_regular(path)
            out.append(path)
    unique: dict[Path, Path] = {}
    for path in out:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _corpus_files_of_folder(folder: Path) -> list[Path]:
    found: list[Path] = []
    unsupported: list[str] = []
    notes: list[str] = []
    for path in walk_folder(folder, notes, keep_folder=is_hf_dataset_dir):
        if path.is_dir() or path.suffix.lower() in SUPPORTED_SUFFIXES:
            found.append(path)
        else:
            unsupported.append(path.relative_to(folder).as_posix())
    if notes:
        logger.warning("Corpus folder '%s': skipped %s", printable(str(folder)), _listed(notes))
    if found:
        return found
    message = (f"Folder '{folder}' holds no corpus files "
               f"(found: {_listed(unsupported) or 'nothing'})")
    hint = (f"Supported: {', '.join(SUPPORTED_SUFFIXES)}, or a Hugging Face dataset folder.")
    if notes:
        message += f"; skipped: {_listed(notes)}"
        hint = ("Copy the files into the folder, or add their own folder to the corpus list: "
                "links that lead out of the chosen folder are not followed. " + hint)
    raise CorpusError(message, hint)


def _listed(items: list[str], most: int = 10) -> str:
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


_LINK_TO_FOLDER = "a link to a folder, not followed"
_LINK_OUT = "a link to a file outside the folder, not followed"


def walk_folder(root: Path, notes: list[str], hidden: bool = False,
                keep_folder=lambda folder: False) -> Iterator[Path]:
    """The plain files under `root`, depth first in sorted order; the walk never leaves `root`.

    A link to a folder is never followed: the folders inside `root` are walked at their own
    place, and a folder elsewhere (or one above, `loop -> ..`) is not the user's choice. A link
    to a file counts when the file lies inside `root`. A folder met twice (a bind mount) is
    walked once. Whatever is skipped gets a line in `notes` ("'sub/x.txt' (why)").

    Args:
        root: the chosen folder.
        notes: collects one line per skipped entry.
        hidden: also walk names starting with ".".
        keep_folder: folders for which this is true are yielded whole instead of entered.
    """
    seen: set = set()
    stack = [_sorted_entries(root, root, notes, seen)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith(".") and not hidden:
            continue
        path = Path(entry.path)
        rel = path.relative_to(root).as_posix()
        if entry.is_symlink():
            reason = _link_problem(path, root)
            if reason:
                notes.append(f"'{printable(rel)}' ({reason})")
                continue
        if entry.is_dir(follow_symlinks=False):
            if keep_folder(path):
                yield path
            else:
                stack.append(_sorted_entries(path, root, notes, seen))
        elif entry.is_file():
            yield path
        else:
            notes.append(f"'{printable(rel)}' (not a regular file: a pipe, socket or device)")


def _link_problem(link: Path, root: Path) -> str:
    """Why a link found inside `root` is not followed ("" for a link to a file inside root)."""
    if not link.exists():
        return "a broken link"
    if link.is_dir():
        return _LINK_TO_FOLDER
    if not is_inside(link, root):
        return _LINK_OUT
    return ""


def _sorted_entries(folder: Path, root: Path, notes: list[str], seen: set) -> Iterator:
    try:
        stat = folder.stat()
        if (stat.st_dev, stat.st_ino) in seen:
            notes.append(f"'{printable(folder.relative_to(root).as_posix())}' (a folder already "
                         "read at another place)")
            return iter(())
        seen.add((stat.st_dev, stat.st_ino))
        with os.scandir(folder) as listing:
            return iter(sorted(listing, key=lambda e: e.name))
    except OSError as exc:
        if folder == root:
            raise CorpusError(f"Cannot read the corpus folder '{folder}': "
                              f"{exc.strerror or exc}") from None
        notes.append(f"'{printable(folder.relative_to(root).as_posix())}' (cannot be read: "
                     f"{exc.strerror or exc})")
        return iter(())


def _not_regular(path: Path) -> CorpusError:
    return CorpusError(f"Corpus path '{path}' is not a regular file (a pipe, socket or device)",
                       "Give a text file, or a folder of them.")


# ---- documents -----------------------------------------------------------------------------
def clean_text(text: str) -> str:
    """Light cleaning shared by every format: BOM, newlines, trailing whitespace."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).rstrip()


def read_documents(path: Path, text_column: str = "") -> Iterator[str]:
    """Yield the cleaned, non-empty documents of one corpus file or dataset folder, each whole
    (a .txt/.md document is its whole file: read_document_parts keeps that in parts).

    Args:
        path: a file with a supported suffix, or a Hugging Face dataset folder.
        text_column: the column holding the text (jsonl/json/csv/parquet/datasets); "" = detect.

    Raises:
        CorpusError: the file is missing, binary, not UTF-8, malformed, or lacks the column.
    """
    return ("".join(parts) for parts in read_document_parts(path, text_column))


def read_document_parts(path: Path, text_column: str = "") -> Iterator[Iterator[str]]:
    """The documents of read_documents, each as an iterator of its text in non-empty parts.

    A .txt/.md file is read 1 MiB at a time and cleaned as it goes (text_stream.py), so a file of
    any size (a 2 GB single line too) costs a chunk of memory; every other format yields a
    record's text as one part (a record is held whole: JSON lines and CSV rows one at a time,
    Parquet and dataset folders a batch of rows at a time). Consume each document's parts before
    asking for the next document. Raises CorpusError as read_documents does (for a text file,
    possibly while its parts are read).
    """
    path = Path(path)
    source = _open_source(path, text_column)
    if source.whole_file:
        parts = _stream_errors(path, clean_chunks(utf8_chunks(path, decode_utf8)))
        first = next(parts, None)
        return iter([chain([first], parts)] if first is not None else [])
    return (iter((doc,)) for doc in _clean_stream(path, source.values))


def _stream_errors(path: Path, parts: Iterator[str]) -> Iterator[str]:
    try:
        yield from parts
    except OSError as exc:
        raise CorpusError(f"Cannot read corpus file '{path}': {exc.strerror or exc}") from None


def inspect_corpus_file(path: Path, text_column: str = "",
                        preview_chars: int = 600) -> CorpusFileInfo:
    """Describe one corpus file for the GUI; problems land in `.error` instead of raising.

    Streams the whole file to count documents and characters (no tokenization), so a very large
    file takes as long as one read of it.
    """
    path = Path(path)
    try:
        fmt = corpus_format(path)
    except CorpusError as exc:
        fmt = path.suffix.lower().lstrip(".")
        return CorpusFileInfo(path, fmt, corpus_size_bytes(path), error=str(exc))
    info = CorpusFileInfo(path, fmt, corpus_size_bytes(path))
    try:
        source = _open_source(path, text_column)
        info.columns, info.text_column = list(source.columns), source.column
        for parts in read_document_parts(path, text_column):
            for part in parts:
                if len(info.preview) < preview_chars and not info.documents:
                    info.preview += part[:preview_chars - len(info.preview)]
                info.characters += len(part)
            info.documents += 1
    except CorpusError as exc:
        info.error = str(exc)
    return info


def corpus_size_bytes(path: Path) -> int:
    """Bytes on disk of a corpus file, or of every file in a dataset folder."""
    path = Path(path)
    return sum(file.stat().st_size for file in corpus_entry_files(path))


def corpus_entry_files(path: Path) -> list[Path]:
    """The files one corpus entry stands for: the file itself, or a dataset folder's files
    (sorted, hidden ones too, without leaving the folder). Nothing for a path that is neither."""
    path = Path(path)
    if path.is_dir():
        return sorted(walk_folder(path, [], hidden=True))
    return [path] if path.is_file() else []


def _clean_stream(path: Path, values: Iterable) -> Iterator[str]:
    try:
        for value in values:
            doc = clean_text(value) if value else ""
            if doc:
                yield doc
    except OSError as exc:
        raise CorpusError(f"Cannot read corpus file '{path}': {exc.strerror or exc}") from None


def _open_source(path: Path, text_column: str) -> CorpusSource:
    """Open a file, settle its text column, and return a lazy iterator over the raw values."""
    fmt = corpus_format(path)
    if path.exists() and not path.is_dir() and not path.is_file():
        raise _not_regular(path)     # opening a pipe would wait for a writer forever
    try:
        if fmt in (HF_DATASET_FORMAT, "parquet"):
            # pyarrow is heavy and only these formats need it: imported on first use.
            from .corpus_arrow import open_hf_dataset, open_parquet
            return (open_hf_dataset if fmt == HF_DATASET_FORMAT else open_parquet)(path, text_column)
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
        if b"\x00" in head:
            raise CorpusError(f"Corpus file '{path}' is not text (found NUL bytes); remove it or "
                              "pick text files", "If it is UTF-16 text, re-save it as UTF-8.")
        if fmt in ("txt", "md"):     # one document, the whole file: read_document_parts streams it
            return CorpusSource([], "", iter(()), whole_file=True)
        if fmt == "json":
            return _open_json(path, text_column)
        if fmt == "jsonl":
            return _open_rows(path, _jsonl_rows(path), text_column)
        return _open_csv(path, text_column)
    except OSError as exc:
        raise CorpusError(f"Cannot read corpus file '{path}': {exc.strerror or exc}") from None


def decode_utf8(data: bytes, path: Path, base_offset: int = 0) -> str:
    """Decode UTF-8 or raise a CorpusError naming the file and the byte offset of the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1]
        raise CorpusError(f"Corpus file '{path}' is not valid UTF-8: byte {bad!r} at offset "
                          f"{base_offset + exc.start}", _UTF8_HINT) from None


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, streamed; '\\n' never occurs inside a UTF-8 sequence."""
    offset = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            line = decode_utf8(raw, path, offset)
            offset += len(raw)
            yield number, line.lstrip("\ufeff") if number == 1 else line


def _jsonl_rows(path: Path) -> Iterator:
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"Corpus file '{path}', line {number}: not valid JSON ({exc.msg})",
                              "Each line of a .jsonl file must be one JSON object, e.g. "
                              '{"text": "..."}. Fix or delete that line.') from None


def _open_json(path: Path, text_column: str) -> CorpusSource:
    if path.stat().st_size > json_stream.STREAM_JSON_BYTES:     # parsed as it is read
        return _open_rows(path, json_stream.json_list_items(path, decode_utf8), text_column)
    text = decode_utf8(path.read_bytes(), path).lstrip("\ufeff")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"Corpus file '{path}' is not valid JSON (line {exc.lineno}: {exc.msg})",
                          "A .json corpus is a list of objects or strings; for one object per "
                          "line use .jsonl.") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise CorpusError(f"Corpus file '{path}' holds an object with {len(lists)} lists "
                              f"(keys: {', '.join(map(str, data)) or 'none'}); expected one list "
                              "of documents", "Save the documents as a JSON list, or as .jsonl.")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise CorpusError(f"Corpus file '{path}' holds a {type(data).__name__}, not a list of "
                          "documents", "A .json corpus is a list of objects or strings.")
    return _open_rows(path, iter(data), text_column)


def _open_rows(path: Path, rows: Iterator, text_column: str) -> CorpusSource:
    """Rows of JSON values: either all strings (each a document) or all objects (read a column)."""
    peeked = list(islice(rows, _PEEK_ROWS))
    rows = chain(peeked, rows)
    if not peeked and not text_column:
        return CorpusSource([], "", iter(()))  # an empty file adds nothing; it is not an error
    if peeked and isinstance(peeked[0], str) and not text_column:
        return CorpusSource([], "", row_values(path, rows, None))
    columns: list[str] = []
    for row in peeked:
        if isinstance(row, dict):
            columns.extend(k for k in row if k not in columns)
    samples = {c: [r.get(c) for r in peeked if isinstance(r, dict)] for c in columns}
    column = pick_text_column(path, columns, text_column,
                              lambda c: any(isinstance(v, str) for v in samples[c]))
    return CorpusSource(columns, column, row_values(path, rows, column))


def _open_csv(path: Path, text_column: str) -> CorpusSource:
    # Corpus cells can be whole books; the csv module's default 128 KiB cap would reject them.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(line for _, line in _text_lines(path))
    try:
        header = next(reader, [])
        peeked = list(islice(reader, _PEEK_ROWS))
    except csv.Error as exc:
        raise CorpusError(f"Corpus file '{path}' is not valid CSV: {exc}") from None
    if not peeked and not text_column:
        return CorpusSource(header, "", iter(()))

    def is_text(index: int) -> bool:
        # Every CSV cell is a string; a column of numbers (ids, scores) is not the text.
        cells = [r[index] for r in peeked if index < len(r) and r[index].strip()]
        return bool(cells) and not all(_is_number(c) for c in cells)

    column = pick_text_column(path, header, text_column,
                              lambda c: is_text(header.index(c)))
    index = header.index(column)

    def values() -> Iterator:
        try:
            for row in chain(peeked, reader):
                yield row[index] if index < len(row) else None
        except csv.Error as exc:
            raise CorpusError(f"Corpus file '{path}' is not valid CSV "
                              f"(line {reader.line_num}): {exc}") from None
    return CorpusSource(header, column, values())


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
