"""The records of a large .json corpus file, parsed as they are read instead of all at once.

    for record in json_list_items(path):      # a list at the top, or an object holding one list
        ...

corpus.py parses a .json file whole up to STREAM_JSON_BYTES (its messages name every key of a
wrong top-level object); a larger file comes here, so that memory holds one record and one read
chunk at a time. The same files give the same records either way. What cannot be known before the
end of a streamed object (a second list after the first one's records were read) is reported when
it is met.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from ..errors import CorpusError
from .text_stream import utf8_chunks

STREAM_JSON_BYTES = 64 << 20
_WHITESPACE = " \t\n\r"
_NUMBER = frozenset("0123456789.eE+-")
_HINT = "A .json corpus is a list of objects or strings; for one object per line use .jsonl."


class _Buffer:
    """Decoded text of the file with a read position; compacts what was consumed."""

    def __init__(self, path: Path, decode: Callable):
        self.path = path
        self.chunks = utf8_chunks(path, decode)
        self.text, self.pos, self.lines_before = "", 0, 0
        self.started = False

    def fill(self, at_least: int = 1) -> bool:
        """Read until `at_least` more characters are buffered or the file ends; False when
        nothing more was there."""
        if self.pos > (1 << 20):
            self.lines_before += self.text.count("\n", 0, self.pos)
            self.text, self.pos = self.text[self.pos:], 0
        before = len(self.text)
        while len(self.text) < before + at_least:
            chunk = next(self.chunks, None)
            if chunk is None:
                return len(self.text) > before
            if not self.started:
                chunk = chunk.lstrip("\ufeff")
                self.started = bool(chunk)
            self.text += chunk
        return True

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file)."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text) or not self.fill():
                return self.text[self.pos:self.pos + 1]

    def error(self, msg: str, at: int | None = None) -> CorpusError:
        line = self.lines_before + self.text.count("\n", 0, self.pos if at is None else at) + 1
        return CorpusError(f"Corpus file '{self.path}' is not valid JSON (line {line}: {msg})", _HINT)

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.error(f"Expecting '{char}'")
        self.pos += 1

    def value(self, decoder: json.JSONDecoder):
        """The next JSON value, read on until it is whole (the buffer doubles each retry, so a
        large value is parsed a few times, not once per chunk)."""
        self.peek()
        while True:
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                # Cut off by the end of the buffer (an open string fails at its start), or wrong?
                cut_off = exc.msg.startswith("Unterminated string") or exc.pos >= len(self.text) - 6
                if not (cut_off and self.fill(max(1, len(self.text) - self.pos))):
                    raise self.error(exc.msg, exc.pos) from None
                continue
            # a number that reaches the end of the buffer ("1" of "1.5") may go on in the next chunk
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and all(c in _NUMBER for c in self.text[end:]) and self.fill():
                continue
            self.pos = end
            return value


def json_list_items(path: Path, decode: Callable) -> Iterator:
    """The records of the list a .json file holds: the file's top-level list, or the one list in
    its top-level object. `decode` is corpus.decode_utf8. CorpusError for anything else."""
    buf, decoder = _Buffer(path, decode), json.JSONDecoder()
    first = buf.peek()
    if first == "[":
        yield from _list_items(buf, decoder)
    elif first == "{":
        yield from _object_list_items(buf, decoder)
    elif first == "":
        raise buf.error("Expecting value")
    else:
        kind = type(buf.value(decoder)).__name__
        raise CorpusError(f"Corpus file '{path}' holds a {kind}, not a list of documents", _HINT)
    if buf.peek() != "":
        raise buf.error("Extra data")


def _list_items(buf: _Buffer, decoder: json.JSONDecoder) -> Iterator:
    buf.expect("[")
    if buf.peek() == "]":
        buf.pos += 1
        return
    while True:
        yield buf.value(decoder)
        sep = buf.peek()
        buf.pos += 1
        if sep == "]":
            return
        if sep != ",":
            raise buf.error("Expecting ',' delimiter", buf.pos - 1)


def _object_list_items(buf: _Buffer, decoder: json.JSONDecoder) -> Iterator:
    buf.expect("{")
    keys, list_key = [], None
    while buf.peek() != "}":
        if keys:
            buf.expect(",")
        if buf.peek() != '"':
            raise buf.error("Expecting property name enclosed in double quotes")
        keys.append(buf.value(decoder))
        buf.expect(":")
        if buf.peek() == "[":
            if list_key is not None:
                raise CorpusError(f"Corpus file '{buf.path}' holds an object with more than one "
                                  f"list (keys '{list_key}' and '{keys[-1]}'); expected one list "
                                  "of documents", "Save the documents as a JSON list, or as .jsonl.")
            list_key = keys[-1]
            yield from _list_items(buf, decoder)
        else:
            buf.value(decoder)
    buf.pos += 1
    if list_key is None:
        raise CorpusError(f"Corpus file '{buf.path}' holds an object with 0 lists (keys: "
                          f"{', '.join(map(str, keys)) or 'none'}); expected one list of documents",
                          "Save the documents as a JSON list, or as .jsonl.")
