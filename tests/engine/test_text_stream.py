"""Streaming text: the parts give exactly what the whole-string functions give, however the file
is cut into chunks, and a large one-line file is read in bounded memory."""
from __future__ import annotations

import json
import random

import pytest

from cpt_studio.engine.data.corpus import clean_text, decode_utf8, read_document_parts, read_documents
from cpt_studio.engine.data.text_stream import clean_chunks, cut_pieces, utf8_chunks
from cpt_studio.engine.errors import CorpusError


def whole_string_pieces(doc: str, limit: int):
    """The pieces packing cut from a whole document before streaming (PACKING_VERSION 2's rule),
    kept here as the reference the streaming cutter must reproduce."""
    start = 0
    while len(doc) - start > limit:
        cut = start + limit
        for ws in (doc.rfind(c, start + 1, cut) for c in "\n "):
            if ws > start:
                while ws + 1 < len(doc) and doc[ws + 1].isspace():
                    ws += 1
                cut = ws
                break
        yield doc[start:cut], False
        start = cut
    yield doc[start:], True


ALPHABET = ["a", "b", "ĉ", "字", "😀", " ", " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", " \n",
            "\ufeff", "\u2028", "\x0c", "\xa0", "word", "longerword"]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def random_cuts(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 12))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_cleaning_in_chunks_gives_clean_text_of_the_whole():
    rng = random.Random(11)
    for _ in range(3000):
        text = random_text(rng, rng.randint(0, 40))
        chunks = random_cuts(rng, text)
        parts = list(clean_chunks(chunks))
        assert all(parts)
        assert "".join(parts) == clean_text(text), (text, chunks)


def test_pieces_do_not_depend_on_the_chunks_and_match_the_whole_string_rule():
    rng = random.Random(12)
    for _ in range(3000):
        text = clean_text(random_text(rng, rng.randint(1, 60)))
        if not text:
            assert list(cut_pieces(random_cuts(rng, text), 5)) == []
            continue
        limit = rng.randint(1, 12)
        expected = list(whole_string_pieces(text, limit))
        assert list(cut_pieces(random_cuts(rng, text), limit)) == expected, (text, limit)


def test_a_character_split_between_reads_is_decoded_whole(tmp_path):
    text = "ĉ字😀a" * 1000
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    for size in (1, 2, 3, 5, 7, 4096):
        assert "".join(utf8_chunks(path, decode_utf8, chunk_bytes=size)) == text


@pytest.mark.parametrize("data, offset", [(b"abc\xffdef", 3), (b"ab\xe2\x82", 2),
                                          (b"x" * 10 + b"\x80" + b"y", 10)])
def test_bad_utf8_names_the_file_and_the_offset_whatever_the_chunk(tmp_path, data, offset):
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    for size in (1, 3, 4096):
        with pytest.raises(CorpusError, match=rf"bad\.txt.*offset {offset}"):
            list(utf8_chunks(path, decode_utf8, chunk_bytes=size))


def test_a_text_file_reads_as_one_document_in_parts(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("\ufeffline one  \r\nline two\t\n\n\n", encoding="utf-8")
    (doc,) = read_documents(path)
    assert doc == "line one\nline two"
    (tmp_path / "blank.md").write_text(" \n\t\n", encoding="utf-8")
    assert list(read_document_parts(tmp_path / "blank.md")) == []


@pytest.mark.slow
def test_a_2_gb_single_line_file_streams_in_bounded_memory(tmp_path):
    """A 2 GB file with no newline, built on the fly, cut into tokenizer pieces in a child process
    whose peak RSS stays within 200 MB of its start (a whole-file read needs over 4 GB)."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "one_line.txt"
    word = "ĉiu vorto " * 100_000                       # 1 MB of text a write, no newline
    total = writes = 0
    with open(path, "w", encoding="utf-8") as fh:
        while total < 2 * 1024 ** 3:
            fh.write(word)
            total += len(word.encode("utf-8"))
            writes += 1
    child = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        from cpt_studio.engine.data.packing import document_pieces
        def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        base = rss()
        n = chars = longest = 0
        last_end = None
        for piece, ends in document_pieces(Path({str(path)!r})):
            n += 1; chars += len(piece); longest = max(longest, len(piece)); last_end = ends
        print(n, chars, longest, last_end, base, rss())
    """)
    out = subprocess.run([sys.executable, "-P", "-c", child], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout.split()
    n, chars, longest, last_end, base, peak = int(out[0]), int(out[1]), int(out[2]), out[3], \
        int(out[4]), int(out[5])
    assert chars == writes * len(word) - 1                 # the text's final space is cleaned off
    assert last_end == "True" and longest <= 100_001 and n >= chars // 100_001
    assert peak - base < 200 * 1024 ** 2, f"peak RSS grew by {(peak - base) / 2**20:.0f} MB"


def json_cases():
    rng = random.Random(5)
    texts = ["plain", "with \"quotes\" and \\ backslash", "ĉ字😀", "line\nbreak", "", "tab\there"]
    for _ in range(40):
        records = []
        for _ in range(rng.randint(0, 8)):
            kind = rng.random()
            if kind < 0.5:
                records.append({"id": rng.randint(-5, 10**6), "text": rng.choice(texts) * rng.randint(1, 50),
                                "score": rng.random(), "ok": rng.choice([True, False, None])})
            else:
                records.append({"text": rng.choice(texts), "tags": ["a", {"b": [1, 2.5e3]}]})
        if rng.random() < 0.5:
            yield json.dumps(records, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5)
        else:
            yield json.dumps({"meta": {"n": len(records)}, "docs": records, "end": 1.5})


def test_a_streamed_json_file_gives_the_records_of_the_whole_file_parse(tmp_path, monkeypatch):
    from cpt_studio.engine.data import json_stream, text_stream

    path = tmp_path / "c.json"
    for index, body in enumerate(json_cases()):
        path.write_text("\ufeff" * (index % 2) + body, encoding="utf-8")
        whole = list(read_documents(path))
        monkeypatch.setattr(json_stream, "STREAM_JSON_BYTES", 0)
        for chunk in (1, 7, 64):
            monkeypatch.setattr(text_stream, "CHUNK_BYTES", chunk)
            assert list(read_documents(path)) == whole, (body, chunk)
        monkeypatch.undo()


@pytest.mark.parametrize("body, message", [
    ('[{"text": "a"}, {"text": tru}]', r"not valid JSON \(line 1: Expecting value\)"),
    ('[{"text": "a"} {"text": "b"}]', r"not valid JSON \(line 1: Expecting ',' delimiter\)"),
    ('[\n{"text": "a"},\n{"text": "b"\n', r"not valid JSON \(line 4: Expecting ',' delimiter"),
    ('"just a string"', r"holds a str, not a list"),
    ('{"a": [{"text": "x"}], "b": []}', r"more than one list \(keys 'a' and 'b'\)"),
    ('{"a": 1, "b": {"c": []}}', r"an object with 0 lists \(keys: a, b\)"),
    ('[{"text": "a"}] 5', r"Extra data"),
])
def test_a_broken_streamed_json_file_says_what_and_where(tmp_path, monkeypatch, body, message):
    from cpt_studio.engine.data import json_stream, text_stream

    monkeypatch.setattr(json_stream, "STREAM_JSON_BYTES", 0)
    monkeypatch.setattr(text_stream, "CHUNK_BYTES", 3)
    path = tmp_path / "broken.json"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"broken\.json.*{message}"):
        list(read_documents(path))
