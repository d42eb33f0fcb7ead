"""The plain-text (.txt) reader: a UTF-8 file as lines, as documents, or as byte
ranges between documents that workers read one by one. No MLX or torch here.

Binary and non-UTF-8 files are refused, naming the file. Documents end at a
delimiter line (TinyStories' `<|endoftext|>`), at blank lines, or at the end of
the file. `text_ranges` cuts a file into byte ranges between documents, so each
of `prepare`'s workers reads its own (`TextRange`, `range_documents`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

DOC_DELIMITER = "<|endoftext|>"  # a line holding only this ends a document
BINARY_SNIFF = 8192  # a NUL byte in the first 8 KiB marks a binary file (as git)
MAX_BREAK_LINE = 4096  # a longer line never ends a range (see text_ranges)


def iter_text_chunks(
    path: Path, chunk: int = 1 << 20, *, start: int = 0, end: int | None = None
) -> Iterator[tuple[str, int]]:
    """Yield (text, raw bytes) of ~1 MiB runs of whole lines of the bytes
    [start, end) of a UTF-8 file (start and end at line starts; end None: the end
    of the file), with \\r\\n made \\n and no byte order mark; DataError naming
    the file for binary or non-UTF-8 content."""
    with open(path, "rb") as f:
        if start == 0 and b"\x00" in f.read(BINARY_SNIFF):
            raise DataError(f"{path}: looks like a binary file (NUL bytes), not text")
        end = os.fstat(f.fileno()).st_size if end is None else end
        f.seek(start)
        offset = start
        while raw := f.read(min(chunk, end - offset)):
            if not raw.endswith(b"\n"):  # finish the line, never past `end`
                raw += f.readline(end - offset - len(raw))
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = offset + e.start
                raise DataError(
                    f"{path}: not UTF-8 text (bad byte at {where})"
                ) from None
            if offset == 0:
                text = text.removeprefix("\ufeff")  # a byte order mark is no text
            offset += len(raw)
            yield text.replace("\r\n", "\n"), len(raw)


def iter_lines(path: Path) -> Iterator[tuple[str, int]]:
    """Yield (line without \\n or \\r\\n, bytes read since the previous line) of a
    UTF-8 file: a chunk's bytes are counted on its first line, so the counts still
    add up to the file size."""
    for text, nbytes in iter_text_chunks(path):
        lines = text.split("\n")
        if lines[-1] == "":  # the chunk ends with a newline
            lines.pop()
        for line in lines:
            yield line, nbytes
            nbytes = 0


def _break_pattern(delimiter: str) -> re.Pattern:
    """A document break in text where every line starts after a "\\n": a run of
    blank lines, or a line holding only the delimiter (and spaces)."""
    if delimiter == "blank":
        return re.compile(r"\n(?:[^\S\n]*\n)+")
    return re.compile(r"\n[^\S\n]*" + re.escape(delimiter) + r"[^\S\n]*(?=\n)")


def iter_documents(
    path: Path,
    delimiter: str = DOC_DELIMITER,
    *,
    start: int = 0,
    end: int | None = None,
) -> Iterator[tuple[str, int]]:
    """Yield (stripped document, bytes read since the previous one) of one .txt
    file, or of its bytes [start, end) (a range from `text_ranges`); documents may
    be "", and a last "" may only carry the bytes after the last document.

    delimiter: a line holding only this text ends a document; "blank": blank lines
    separate documents; "none": the whole file is one document. The file is
    scanned ~1 MiB at a time with one regex (a Python loop per line would be the
    slowest part of `prepare`).
    """
    chunks = iter_text_chunks(path, start=start, end=end)
    if delimiter == "none":
        parts, nbytes = [], 0
        for text, n in chunks:
            parts.append(text)
            nbytes += n
        if nbytes:
            yield "".join(parts).strip(), nbytes
        return
    if leftover := (yield from _split(chunks, _break_pattern(delimiter), delimiter)):
        yield "", leftover


def range_documents(path: Path, delimiter: str, start: int, end: int) -> list[str]:
    """The documents of bytes [start, end) of a .txt file: those of
    `iter_documents` without a last "" that only carries bytes. Over the ranges of
    `text_ranges`, the documents of the whole file."""
    if delimiter == "none":
        return [doc for doc, _ in iter_documents(path, delimiter, start=start, end=end)]
    chunks = iter_text_chunks(path, start=start, end=end)
    return [doc for doc, _ in _split(chunks, _break_pattern(delimiter), delimiter)]


def _split(chunks: Iterable[tuple[str, int]], pattern: re.Pattern, delimiter: str):
    """Yield (document, bytes since the previous one) between the breaks of text
    chunks; return the bytes read after the last document."""
    rest, pending = "\n", 0  # a "\n" before the first line, so it can be a break
    for text, n in chunks:
        scan = len(rest) - 1  # a break can start at the "\n" that ends `rest`
        rest += text
        pending += n
        pos = 0
        for m in pattern.finditer(rest, scan):
            doc = rest[pos : m.start()].strip()
            pos = m.end()
            if doc or delimiter != "blank":
                yield doc, pending
                pending = 0
        rest = rest[pos:]
    rest += "\n"  # the last line may lack its newline
    pos = 0
    for m in pattern.finditer(rest):
        doc = rest[pos : m.start()].strip()
        pos = m.end()
        if doc or delimiter != "blank":
            yield doc, pending
            pending = 0
    if doc := rest[pos:].strip():
        yield doc, pending
        pending = 0
    return pending


def text_ranges(path: Path, delimiter: str, target: int) -> Iterator[tuple[int, int]]:
    """Byte ranges [start, end) covering a .txt file in order, each `target` bytes
    or more, cut only where no document is: at the start of a blank line
    ("blank"), or at the start of the line after a delimiter line. Reading the
    ranges one by one with `range_documents` gives the documents of the whole file.
    "none", or no such line after `target` bytes: one range. Reads a line or so
    per cut."""
    if target < 1:
        raise ValueError(f"target must be >= 1 byte, got {target}")
    size = path.stat().st_size
    start = 0
    if delimiter != "none":
        is_break = _break_pattern(delimiter).match
        with open(path, "rb") as f:
            while start + target < size:
                cut = _next_cut(f, start + target, is_break, delimiter == "blank")
                if cut is None or cut == size:
                    break
                yield start, cut
                start = cut
    yield start, size


def _next_cut(f, pos: int, is_break, before: bool) -> int | None:
    """The first line start >= pos of a break line (before: its start, else the
    start of the next line), or None at the end of the file. Lines are read at
    most MAX_BREAK_LINE bytes at a time: a longer line is no break."""
    f.seek(pos - 1)
    while (part := f.readline(MAX_BREAK_LINE)) and not part.endswith(b"\n"):
        pass  # to the end of the line holding byte pos - 1
    while True:
        at = f.tell()
        line = f.readline(MAX_BREAK_LINE)
        if not line.endswith(b"\n"):  # the end of the file, or a long line
            if len(line) < MAX_BREAK_LINE:
                return None
            while (part := f.readline(MAX_BREAK_LINE)) and not part.endswith(b"\n"):
                pass
            continue
        try:
            text = line.decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError:
            continue  # its reader reports it
        if is_break("\n" + text):
            return at if before else f.tell()


@dataclass(frozen=True)
class TextRange:
    """Bytes [start, end) of a .txt file, split into documents by `delimiter`: a
    task of `prepare`'s workers, which read it themselves."""

    path: Path
    start: int
    end: int
    delimiter: str

    def documents(self) -> list[str]:
        """The range's documents (`range_documents`)."""
        return range_documents(self.path, self.delimiter, self.start, self.end)
