"""Corpus reading: every format gives the same documents; every bad input names the file."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cpt_studio.engine.data.corpus import (SUPPORTED_SUFFIXES, expand_corpus_paths, inspect_corpus_file,
                                      read_documents)
from cpt_studio.engine.errors import CorpusError

DOCS = [
    "La bazaro estas plena de homoj.\nĈiu vendisto krias: \"freŝaj pomoj, bonaj prezoj!\"",
    "The quick brown fox jumps over the lazy dog, twice; then it rests.",
    "Continued pretraining teaches a model a new language.\n\nSecond paragraph, with a comma.",
]
FORMATS = ("txt", "md", "jsonl", "json_objects", "json_strings", "json_wrapped", "csv", "parquet",
           "hf_dataset", "hf_dataset_dict")


def write_corpus(fmt: str, folder: Path, docs: list[str] = DOCS) -> Path:
    """Write docs in one format under folder; returns the path to give the corpus reader."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "text": d} for i, d in enumerate(docs)]
    if fmt in ("txt", "md"):
        for i, doc in enumerate(docs):
            # CRLF, a BOM and trailing blanks: the light cleaning must make them vanish.
            raw = "\ufeff" + doc.replace("\n", "  \r\n") + "\r\n\r\n"
            (folder / f"{i:02d}.{fmt}").write_bytes(raw.encode("utf-8"))
        return folder
    if fmt == "jsonl":
        path = folder / "c.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in rows), "utf-8")
    elif fmt.startswith("json_"):
        data = {"json_objects": rows, "json_strings": list(docs),
                "json_wrapped": {"version": 1, "rows": rows}}[fmt]
        path = folder / "c.json"
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2), "utf-8")
    elif fmt == "csv":
        path = folder / "c.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "text"])
            writer.writerows([r["id"], r["text"]] for r in rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = folder / "c.parquet"
        # Tiny row groups: reading must stream across several of them.
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    else:
        import datasets
        dataset = datasets.Dataset.from_list(rows)
        path = folder / "ds"
        if fmt == "hf_dataset_dict":
            dataset = datasets.DatasetDict({"train": dataset, "test": dataset.select([0])})
        dataset.save_to_disk(str(path))
    return path


def documents(paths: list) -> list[str]:
    paths = expand_corpus_paths([str(p) for p in paths])
    return [doc for path in paths for doc in read_documents(path)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_yields_the_same_documents(tmp_path, fmt):
    assert documents([write_corpus(fmt, tmp_path / fmt)]) == DOCS


def test_supported_suffixes_cover_the_documented_formats():
    assert set(SUPPORTED_SUFFIXES) == {".txt", ".md", ".jsonl", ".json", ".csv", ".parquet"}


def test_text_column_is_detected_by_name_then_by_first_string_column(tmp_path):
    by_name = tmp_path / "a.jsonl"
    by_name.write_text('{"id": 1, "title": "T", "content": "the body"}\n', "utf-8")
    by_type = tmp_path / "b.jsonl"
    by_type.write_text('{"n": 1, "score": 0.5, "words": "only text here"}\n', "utf-8")
    numeric_first = tmp_path / "c.csv"
    numeric_first.write_text("id,sentence\n1,hello there\n2,general kenobi\n", "utf-8")
    assert list(read_documents(by_name)) == ["the body"]
    assert list(read_documents(by_type)) == ["only text here"]
    assert list(read_documents(numeric_first)) == ["hello there", "general kenobi"]
    info = inspect_corpus_file(numeric_first)
    assert (info.columns, info.text_column, info.documents) == (["id", "sentence"], "sentence", 2)


def test_an_explicit_text_column_is_read(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"title": "First", "text": "body one"}\n{"title": "Second", "text": "b2"}\n')
    assert list(read_documents(path, text_column="title")) == ["First", "Second"]
    parquet = write_corpus("parquet", tmp_path / "pq")
    assert inspect_corpus_file(parquet, text_column="text").text_column == "text"


def test_csv_cells_may_hold_whole_books(tmp_path):
    book = "word " * 60_000 + "end"          # 300 KB, past the csv module's 128 KiB default cap
    path = tmp_path / "books.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["title", "text"], ["Big", book], ["Small", "short"]])
    assert list(read_documents(path)) == [book, "short"]


def test_a_folder_is_walked_in_sorted_order_skipping_hidden_and_unsupported(tmp_path):
    root = tmp_path / "corpus"
    (root / "b_sub").mkdir(parents=True)
    (root / "b_sub" / "2.md").write_text("second")
    (root / "a.txt").write_text("first")
    (root / "c.jsonl").write_text('{"text": "third"}\n')
    (root / ".hidden.txt").write_text("never")
    (root / "b_sub" / "empty.jsonl").write_text("")       # empty files add nothing, no error
    (root / "b_sub" / "header_only.csv").write_text("id,text\n")
    (root / "notes.docx").write_bytes(b"PK\x03\x04")
    write_corpus("hf_dataset", root / "d_data", ["fourth"])
    paths = expand_corpus_paths([str(root)])
    assert [p.relative_to(root).as_posix() for p in paths] == [
        "a.txt", "b_sub/2.md", "b_sub/empty.jsonl", "b_sub/header_only.csv", "c.jsonl", "d_data/ds"]
    assert documents([root]) == ["first", "second", "third", "fourth"]


def test_inspect_reports_columns_counts_and_preview(tmp_path):
    info = inspect_corpus_file(write_corpus("jsonl", tmp_path), preview_chars=10)
    assert info.format == "jsonl" and info.error == ""
    assert info.columns == ["id", "text"] and info.text_column == "text"
    assert info.documents == 3 and info.characters == sum(len(d) for d in DOCS)
    assert info.preview == DOCS[0][:10] and info.size_bytes > 0
    txt = inspect_corpus_file(write_corpus("txt", tmp_path / "t") / "00.txt")
    assert (txt.columns, txt.documents, txt.preview) == ([], 1, DOCS[0])
    hf = inspect_corpus_file(write_corpus("hf_dataset_dict", tmp_path / "hf"))
    assert (hf.format, hf.columns, hf.text_column, hf.documents) == ("hf_dataset", ["id", "text"],
                                                                     "text", 3)
    bad = inspect_corpus_file(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in bad.error and bad.documents == 0


# ---- bad inputs: a CorpusError that names the file ---------------------------------------------
def _error(paths, text_column: str = "") -> str:
    with pytest.raises(CorpusError) as info:
        documents_with_column(paths, text_column)
    return str(info.value)


def documents_with_column(paths, text_column):
    for path in expand_corpus_paths([str(p) for p in paths]):
        list(read_documents(path, text_column))


def test_missing_path(tmp_path):
    assert "missing.txt" in _error([tmp_path / "missing.txt"])


def test_binary_file(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(b"GGUF\x00\x00\x01\x02" * 100)
    message = _error([path])
    assert "weights.txt" in message and "not text (found NUL bytes)" in message


def test_latin1_file_names_the_byte_offset(tmp_path):
    path = tmp_path / "old.txt"
    path.write_bytes("Caf\u00e9 cr\u00e8me".encode("latin-1"))
    message = _error([path])
    assert "old.txt" in message and "offset 3" in message and "UTF-8" in message
    lines = tmp_path / "old.jsonl"
    lines.write_bytes(b'{"text": "ok"}\n' + '{"text": "Caf\u00e9"}\n'.encode("latin-1"))
    assert "offset 28" in _error([lines])     # 15 bytes of line 1 + 13 into line 2


def test_bad_jsonl_line_names_the_line_number(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"\n{"text": "three"}\n')
    message = _error([path])
    assert "broken.jsonl" in message and "line 3" in message


def test_missing_column_lists_the_columns(tmp_path):
    path = write_corpus("csv", tmp_path)
    message = _error([path], text_column="body_text")
    assert "c.csv" in message and "body_text" in message and "columns: id, text" in message
    parquet = write_corpus("parquet", tmp_path)
    assert "columns: id, text" in _error([parquet], text_column="nope")


def test_empty_folder_lists_what_it_found(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "page1.pdf").write_bytes(b"%PDF")
    message = _error([folder])
    assert "scans" in message and "page1.pdf" in message and ".jsonl" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in _error([empty])


def test_unsupported_suffix_lists_the_supported_ones(tmp_path):
    path = tmp_path / "book.docx"
    path.write_bytes(b"PK")
    message = _error([path])
    assert "book.docx" in message and ".txt" in message and ".parquet" in message
