"""Documents as streams of text: a .txt/.md file of any size read, cleaned and cut into tokenizer
pieces without ever holding more than a chunk of it.

    chunks = utf8_chunks(path, decode_utf8)          # decoded text, 1 MiB of the file at a time
    cleaned = clean_chunks(chunks)                   # what clean_text gives for the whole, in parts
    for piece, ends in cut_pieces(cleaned, 100_000): # the pieces the tokenizer is given
        ...

Each stage gives exactly what its whole-string counterpart gives for the joined text:
"".join(clean_chunks(c)) == clean_text("".join(c)) for any cut of the text into chunks, and
cut_pieces yields the same pieces whatever the chunks are (so the token ids, and the packed blocks,
do not depend on how the file was read). Memory: one chunk plus one piece, plus any whitespace run
held back (trailing whitespace is only known to be trailing when the text after it arrives).
"""
from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

CHUNK_BYTES = 1 << 20


def utf8_chunks(path: Path, decode: Callable[[bytes, Path, int], str],
                chunk_bytes: int | None = None) -> Iterator[str]:
    """The text of a UTF-8 file, `chunk_bytes` (default CHUNK_BYTES) at a time; a character split
    between two reads is carried to the next. `decode(data, path, offset)` decodes one complete
    piece (corpus.decode_utf8: its error names the file and the bad byte's offset in it)."""
    offset, carry = 0, b""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk_bytes)
            if not data:
                break
            data = carry + data
            whole = _complete_utf8_prefix(data)
            carry = data[whole:]
            if whole:
                yield decode(data[:whole], path, offset)
            offset += whole
    if carry:                # the file ends inside a character: decode reports that byte
        yield decode(carry, path, offset)


def _complete_utf8_prefix(data: bytes) -> int:
    """How many leading bytes of `data` end on a character boundary (the last character's lead
    byte may need up to 3 more bytes than `data` holds)."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0xC0 == 0x80:          # a continuation byte: look further back for the lead
            continue
        need = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        return n - back if need > back else n
    return n                             # no lead byte in reach: invalid, decode says where


def clean_chunks(chunks: Iterable[str]) -> Iterator[str]:
    """corpus.clean_text in parts: no leading BOM, \\r\\n and \\r as \\n, no whitespace at the end
    of a line or of the text. Yields non-empty parts; none at all for a text that cleans to ""."""
    started = False          # past the leading BOMs
    cr = ""                  # a "\r" that ended the previous chunk (it may be half of "\r\n")
    held = ""                # trailing whitespace not yet known to be followed by text
    for chunk in chunks:
        if not started:
            chunk = chunk.lstrip("\ufeff")
            if not chunk:
                continue
            started = True
        text = cr + chunk
        cr = "\r" if text.endswith("\r") else ""
        if cr:
            text = text[:-1]
        text = held + text.replace("\r\n", "\n").replace("\r", "\n")
        end = len(text.rstrip())
        held = text[end:]
        if end:
            # Each line's end is stripped; the last line ends in text, so only whole lines change.
            yield "\n".join(line.rstrip() for line in text[:end].split("\n"))
    # what is left (held, cr) is trailing whitespace of the whole text: dropped


def cut_pieces(chunks: Iterable[str], limit: int) -> Iterator[tuple[str, bool]]:
    """(piece, ends the text) for the text `chunks` join to: pieces of at most `limit` characters,
    each cut just before a whitespace character where there is one (the last newline before the
    limit, else the last space, then on to the last character of that run of whitespace, which may
    pass the limit). Nothing for an empty text.

    Tokenizers need memory for the whole text they are given (~100 bytes a character), so a
    document is fed to them a piece at a time. Byte-level BPE tokenizers (GPT-2 style
    pre-tokenizers) never merge across the space a cut is put before, so the ids are those of the
    whole document."""
    buf, start = "", 0       # the text not yet yielded is buf[start:]
    for chunk in chain(chunks, [None]):          # None: the text has ended
        if chunk is not None:
            buf, start = buf[start:] + chunk, 0
        while (cut := _next_cut(buf, start, limit, ended=chunk is None)) is not None:
            yield buf[start:cut], False
            start = cut
    if len(buf) > start:
        yield buf[start:], True


def _next_cut(buf: str, start: int, limit: int, ended: bool) -> int | None:
    """Where the piece starting at `start` ends, or None: the rest fits in one piece, or (text not
    ended) the cut's run of whitespace may go on in the next chunk."""
    if len(buf) - start <= limit:
        return None
    cut = start + limit
    for ws in (buf.rfind(c, start + 1, cut) for c in "\n "):
        if ws > start:
            while ws + 1 < len(buf) and buf[ws + 1].isspace():
                ws += 1
            if ws + 1 == len(buf) and not ended:
                return None          # the run reaches the end of what was read so far
            return ws
    return cut
