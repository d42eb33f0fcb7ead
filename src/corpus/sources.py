"""Where documents come from: local .txt, .jsonl/.json and .parquet files, and
Hugging Face hub datasets, read as one stream of documents. No MLX or torch here.

- .txt: read here, line by line (binary and non-UTF-8 files are refused, naming the
  file); documents end at a delimiter line (TinyStories' `<|endoftext|>`), at blank
  lines, or at the end of the file. `text_ranges` cuts a file into byte ranges
  between documents, so workers can each read their own (`range_documents`).
- .jsonl/.json and .parquet: `datasets.load_dataset("json"|"parquet",
  data_files=..., streaming=True)`, one file at a time so an error names the file.
- hub: `datasets.load_dataset(name, config, split=..., streaming=True)`: the same
  streaming code path as the local jsonl/parquet files, so tests exercise it offline.

Everything streams: memory does not grow with the corpus.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..template import CHAT, render_conversation

DOC_DELIMITER = "<|endoftext|>"  # a line holding only this ends a document
BINARY_SNIFF = 8192  # a NUL byte in the first 8 KiB marks a binary file (as git)
MAX_BREAK_LINE = 4096  # a longer line never ends a range (see text_ranges)
TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# What a folder contributes (a .json file is read only when named: folders often
# hold meta.json or tokenizer.json beside the data).
FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_TEXT_FIELD = "text"


def _suffix(p: Path) -> str:
    return p.suffix.lower()


def expand_inputs(
    specs: Iterable[str | Path], suffixes: tuple[str, ...] = TEXT_SUFFIXES
) -> list[Path]:
    """Files, folders (every file below with one of `suffixes`, sorted) and globs
    -> unique file paths, in the order given."""
    paths: dict[Path, None] = {}
    kinds = "/".join(suffixes)
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*") if q.is_file() and _suffix(q) in suffixes
            )
            if not found:
                raise DataError(f"{p}: folder holds no {kinds} files")
        elif p.is_file():
            found = [p]
        elif any(c in str(spec) for c in "*?["):
            found = sorted(Path(q) for q in glob.glob(str(spec), recursive=True))
            if not (found := [q for q in found if q.is_file()]):
                raise DataError(f"no files match {str(spec)!r}")
        else:
            raise DataError(f"{p}: no such file or folder")
        paths.update(dict.fromkeys(found))
    if not paths:
        raise DataError("no input files given")
    return list(paths)


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


def _datasets():
    try:
        import datasets  # heavy: imported only when a record source is read
    except ImportError:
        raise DataError(
            "reading .jsonl/.parquet files or hub datasets needs the `datasets` "
            "package (pip install datasets)"
        ) from None
    return datasets


def iter_records(
    rows: Iterable[dict], where: str, text_field: str, chat: bool = False
) -> Iterator[tuple[str, int]]:
    """(stripped text, 0) of each row's `text_field`; DataError naming `where`
    when the field is missing or not a string. With `chat`, the field holds a
    conversation (a list of {"role", "content"} messages), rendered as one text
    in the chat template (`src.template.CHAT`)."""
    for i, row in enumerate(rows):
        if text_field not in row:
            raise DataError(
                f"{where}: row {i} has no field {text_field!r} (fields: "
                f"{', '.join(sorted(row))}); choose one with --text-field"
            )
        text = row[text_field]
        if text is None:
            continue
        if chat:
            try:
                text = render_conversation(text, CHAT)
            except ValueError as e:
                raise DataError(f"{where}: row {i} field {text_field!r}: {e}") from None
        if not isinstance(text, str):
            hint = " (a conversation? use --chat)" if isinstance(text, list) else ""
            raise DataError(
                f"{where}: row {i} field {text_field!r} is a {type(text).__name__},"
                f" not text{hint}"
            )
        yield text.strip(), 0


def _stream(where: str, load) -> Iterator[dict]:
    """Rows of a `datasets` stream; its errors (bad JSON, a damaged parquet file,
    no network) become DataError naming `where`."""
    # datasets logs such errors with a traceback before raising: we say it once.
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield from load()
    except DataError:
        raise
    except Exception as e:  # pyarrow, fsspec, hub and network errors alike
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{where}: cannot read it: {type(e).__name__}: {msg}") from e
    finally:
        log.setLevel(level)


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face hub dataset, streamed (needs network at run time)."""

    name: str
    config: str | None = None
    split: str = "train"

    def describe(self) -> dict:
        return {"hf_dataset": self.name, "config": self.config, "split": self.split}


def iter_hub(
    src: HubSource, text_field: str, chat: bool = False
) -> Iterator[tuple[str, int]]:
    ds = _datasets()

    def load():
        return ds.load_dataset(src.name, src.config, split=src.split, streaming=True)

    where = f"hub dataset {src.name}" + (f" ({src.config})" if src.config else "")
    where += f", split {src.split!r}"
    return iter_records(_stream(where, load), where, text_field, chat)


def iter_file(
    path: Path,
    delimiter: str = DOC_DELIMITER,
    text_field: str = DEFAULT_TEXT_FIELD,
    chat: bool = False,
) -> Iterator[tuple[str, int]]:
    """(document, bytes consumed or 0) of one local file of any supported kind;
    `chat` as in `iter_records`."""
    builder = RECORD_SUFFIXES.get(_suffix(path))
    if builder is None:
        yield from iter_documents(path, delimiter)
        return
    ds = _datasets()

    def load():
        return ds.load_dataset(
            builder, data_files=[str(path)], split="train", streaming=True
        )

    yield from iter_records(_stream(str(path), load), str(path), text_field, chat)


def iter_corpus(
    source: list[Path] | HubSource,
    delimiter: str = DOC_DELIMITER,
    text_field: str = DEFAULT_TEXT_FIELD,
) -> Iterator[tuple[str, int]]:
    """Every document of local files (in order) or of a hub dataset."""
    if isinstance(source, HubSource):
        yield from iter_hub(source, text_field)
        return
    for path in source:
        yield from iter_file(path, delimiter, text_field)


def describe(source: list[Path] | HubSource) -> list[dict]:
    """A JSON-able description of a source, for meta.json."""
    if isinstance(source, HubSource):
        return [source.describe()]
    return [{"path": str(p), "bytes": p.stat().st_size} for p in source]


def find_corpus(spec: str | None = None) -> list[Path]:
    """`spec` (a file, folder or glob), else TinyStories from data/raw/ (under the
    cwd, then the repo) or ../shared/data/ (from the cwd, then beside the repo)."""
    if spec is not None:
        return expand_inputs([spec])
    repo = Path(__file__).resolve().parents[1]
    looked: list[str] = []
    for raw in (Path("data/raw"), repo / "data" / "raw"):
        looked.append(f"{raw}/[Tt]iny[Ss]tories*.txt")
        found = sorted(raw.glob("[Tt]iny[Ss]tories*.txt"))
        if found:  # prefer the training split when several are there
            return [p for p in found if "train" in p.name.lower()] or found
    for shared in (Path("../shared/data"), repo.parent / "shared" / "data"):
        looked.append(str(candidate := shared / "tinystories_train.txt"))
        if candidate.is_file():
            return [candidate]
    raise DataError(
        f"no training text found (looked for {', '.join(looked)}); pass --data PATH "
        "(a .txt file, folder or glob) or download TinyStories with `python -m "
        "src.data download --output data/raw/tinystories_train.txt`"
    )
