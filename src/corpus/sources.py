"""One protocol for every data source: a local .txt file (`TextFile`), a
.jsonl/.json/.parquet file (`RecordFile`) or a Hugging Face hub dataset
(`HubDataset`), read as one stream of documents. No MLX or torch here.

Each `Source` says, in one place, what it is and how it is read: `records` (rows
with fields, which `--text-field` and `--chat` apply to), `describe()` (for
meta.json), `size` (bytes, for progress bars), its `documents`, the `lines` a
tokenizer trains on, and the `tasks` of `prepare`'s workers. `open_sources` is the
one place that turns `--input` specs (files, folders, globs) or a hub dataset into
sources; `add_source_args` and `sources_from_args` are the one definition of the
source flags of `python -m src.data prepare` and `python -m src.tokenizer train`.
The readers themselves are `src.corpus.text` and `src.corpus.records`. Everything
streams: memory does not grow with the corpus, and nothing is opened (no file, no
network) until a source is read.
"""

from __future__ import annotations

import argparse
import glob
import itertools
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import DataError, utf8_problem
from .records import batched, datasets_module, iter_records, stream
from .text import DOC_DELIMITER, TextRange, iter_documents, iter_lines, text_ranges

TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# What a folder contributes (a .json file is read only when named: folders often
# hold meta.json or tokenizer.json beside the data).
FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_TEXT_FIELD = "text"

# A task of `prepare`'s workers: a byte range of a .txt file, which the worker
# reads itself, or texts the parent read (records).
Task = TextRange | list[str]


@dataclass(frozen=True)
class ReadOptions:
    """How sources are read: `delimiter` ends documents in .txt files (see
    `src.corpus.text.iter_documents`); `text_field` is the field of record rows
    holding the text, a conversation rendered in the chat template with `chat`.
    `skipped` counts, as they are read, the record rows skipped for having no
    text in that field, by reason (`src.corpus.records.SKIP_REASONS`): for the
    caller to report."""

    delimiter: str = DOC_DELIMITER
    text_field: str = DEFAULT_TEXT_FIELD
    chat: bool = False
    skipped: Counter = field(default_factory=Counter, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Checked at the door: a delimiter that no line can equal, or a field name
        # no row can have, would read every file as one document, or nothing.
        d = self.delimiter
        for flag, value in (("--delimiter", d), ("--text-field", self.text_field)):
            if problem := utf8_problem(value):
                raise DataError(f"{flag}: {problem}")
        if not d.strip() or "\n" in d or "\r" in d:
            raise DataError(
                f"--delimiter {d!r}: must be the text of one line ('blank': blank "
                "lines separate documents; 'none': one document per file)"
            )


class Source(ABC):
    """Where documents come from. `str(source)` names it in messages."""

    records: ClassVar[bool]  # rows with fields (--text-field, --chat), not text

    @property
    @abstractmethod
    def size(self) -> int | None:
        """Bytes to read (for progress bars); None when unknown (the hub)."""

    @abstractmethod
    def describe(self) -> dict:
        """What meta.json records about the source (JSON-able)."""

    @abstractmethod
    def documents(self, opts: ReadOptions) -> Iterator[tuple[str, int]]:
        """(stripped document, bytes consumed since the previous one, or 0), in
        order; documents may be ""."""

    @abstractmethod
    def lines(
        self, opts: ReadOptions, max_docs: int | None = None
    ) -> Iterator[tuple[str, int]]:
        """(line, bytes read since the previous line) that a tokenizer trains on;
        of the first `max_docs` rows of a record source (None: all)."""

    @abstractmethod
    def tasks(
        self, opts: ReadOptions, batch_docs: int, range_bytes: int
    ) -> Iterator[Task]:
        """The source as `prepare`'s worker tasks, in order: byte ranges of about
        `range_bytes` (.txt) or lists of at most `batch_docs` texts (records)."""


class _OnDisk:
    """A local file source: named by its path, measured in bytes."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # frozen: at init only

    def __str__(self) -> str:
        return str(self.path)

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def describe(self) -> dict:
        return {"path": str(self.path), "bytes": self.size}


@dataclass(frozen=True)
class TextFile(_OnDisk, Source):
    """A local .txt file: documents end at `--delimiter` lines; `prepare`'s
    workers each read a byte range of it themselves."""

    path: Path
    records = False

    def documents(self, opts: ReadOptions) -> Iterator[tuple[str, int]]:
        return iter_documents(self.path, opts.delimiter)

    def lines(
        self, opts: ReadOptions, max_docs: int | None = None
    ) -> Iterator[tuple[str, int]]:
        return iter_lines(self.path)  # every line: max_docs counts rows

    def tasks(
        self, opts: ReadOptions, batch_docs: int, range_bytes: int
    ) -> Iterator[Task]:
        for start, end in text_ranges(self.path, opts.delimiter, range_bytes):
            yield TextRange(self.path, start, end, opts.delimiter)


class _Rows(Source):
    """Rows with fields, streamed by `datasets`: the text is a field of each."""

    records = True

    @abstractmethod
    def _load(self, datasets) -> Iterable[dict]:
        """The stream of rows (`datasets.load_dataset(..., streaming=True)`)."""

    def documents(self, opts: ReadOptions) -> Iterator[tuple[str, int]]:
        ds = datasets_module()
        rows = stream(str(self), lambda: self._load(ds))
        yield from iter_records(
            rows, str(self), opts.text_field, opts.chat, opts.skipped
        )

    def lines(
        self, opts: ReadOptions, max_docs: int | None = None
    ) -> Iterator[tuple[str, int]]:
        # A text's bytes (UTF-8, and the newline that would end it in a file)
        # count on its first line, so the counts add up as a .txt file's do.
        for text, _ in itertools.islice(self.documents(opts), max_docs):
            nbytes = len(text.encode("utf-8")) + 1
            for line in text.split("\n"):
                yield line.removesuffix("\r"), nbytes
                nbytes = 0

    def tasks(
        self, opts: ReadOptions, batch_docs: int, range_bytes: int
    ) -> Iterator[Task]:
        return batched((text for text, _ in self.documents(opts)), batch_docs)


@dataclass(frozen=True)
class RecordFile(_OnDisk, _Rows):
    """A local .jsonl/.json (one JSON object per line) or .parquet file, read one
    file at a time so an error names the file."""

    path: Path

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.path.suffix.lower() not in RECORD_SUFFIXES:
            raise DataError(f"{self.path}: not a .jsonl, .json or .parquet file")

    def _load(self, datasets) -> Iterable[dict]:
        builder = RECORD_SUFFIXES[self.path.suffix.lower()]
        return datasets.load_dataset(
            builder, data_files=[str(self.path)], split="train", streaming=True
        )


@dataclass(frozen=True)
class HubDataset(_Rows):
    """A Hugging Face hub dataset, streamed: it needs network when read, and only
    then (making or describing one connects to nothing)."""

    name: str
    config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        config = f" ({self.config})" if self.config else ""
        return f"hub dataset {self.name}{config}, split {self.split!r}"

    @property
    def size(self) -> None:
        return None

    def describe(self) -> dict:
        return {"hf_dataset": self.name, "config": self.config, "split": self.split}

    def _load(self, datasets) -> Iterable[dict]:
        return datasets.load_dataset(
            self.name, self.config, split=self.split, streaming=True
        )


def task_documents(task: Task) -> list[str]:
    """The documents of a worker task: a text range is read here and now; a list
    of texts is its own."""
    return task.documents() if isinstance(task, TextRange) else task


# ------------------------------------------------------------ opening sources


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
                q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in suffixes
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


def open_file(path: str | Path) -> Source:
    """A local file as a source: .jsonl/.json/.parquet hold records, any other
    file is read as text."""
    path = Path(path)
    if path.suffix.lower() in RECORD_SUFFIXES:
        return RecordFile(path)
    return TextFile(path)


def open_sources(
    inputs: Iterable[str | Path | Source] | None = None,
    hub: HubDataset | None = None,
    suffixes: tuple[str, ...] = FOLDER_SUFFIXES,
) -> list[Source]:
    """`--input` specs (files, folders: every file below with one of `suffixes`,
    globs; see `expand_inputs`) and sources as they are, or a hub dataset -> the
    unique sources to read, in order. Opens nothing yet."""
    if (inputs is None) == (hub is None):
        raise DataError("give either input files or a hub dataset")
    if hub is not None:
        return [hub]
    sources: dict[Source, None] = {}
    for item in inputs:
        if isinstance(item, Source):
            sources[item] = None
        else:
            paths = expand_inputs([item], suffixes)
            sources.update(dict.fromkeys(map(open_file, paths)))
    if not sources:
        raise DataError("no input files given")
    return list(sources)


def iter_corpus(
    sources: Iterable[Source], opts: ReadOptions | None = None
) -> Iterator[tuple[str, int]]:
    """Every document of the sources, in order (see `Source.documents`)."""
    opts = opts or ReadOptions()
    for source in sources:
        yield from source.documents(opts)


def find_corpus(spec: str | None = None) -> list[Path]:
    """`spec` (a file, folder or glob), else TinyStories from data/raw/ (under the
    cwd, then the repo) or ../shared/data/ (from the cwd, then beside the repo)."""
    if spec is not None:
        return expand_inputs([spec])
    repo = Path(__file__).resolve().parents[2]  # src/corpus/sources.py
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


# ------------------------------------------------------------ command lines


def add_source_args(
    parser: argparse.ArgumentParser,
    *,
    text_field_default: str | None = DEFAULT_TEXT_FIELD,
    text_field_help: str = "field of jsonl/parquet/hub rows holding the text "
    f"(default {DEFAULT_TEXT_FIELD})",
) -> None:
    """Add the source flags to a parser (or argument group): `--input PATH...` or
    `--hf-dataset NAME` (exactly one), `--hf-config`, `--hf-split` and
    `--text-field`; read them back with `sources_from_args`."""
    one = parser.add_mutually_exclusive_group(required=True)
    one.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="files, folders (every .txt, .jsonl and .parquet file below) or globs",
    )
    one.add_argument(
        "--hf-dataset",
        metavar="NAME",
        help="a Hugging Face hub dataset, streamed (needs network)",
    )
    add = parser.add_argument
    add("--hf-config", metavar="C", help="hub dataset config, e.g. sample-10BT")
    add("--hf-split", default="train", metavar="S", help="hub split (default train)")
    add(
        "--text-field", default=text_field_default, metavar="NAME", help=text_field_help
    )


def sources_from_args(args: argparse.Namespace) -> list[Source]:
    """The sources the flags of `add_source_args` name; DataError for
    `--hf-config` without `--hf-dataset`, and for inputs that do not exist."""
    if args.hf_dataset:
        hub = HubDataset(args.hf_dataset, args.hf_config, args.hf_split)
        return open_sources(hub=hub)
    if args.hf_config:
        raise DataError("--hf-config needs --hf-dataset")
    return open_sources(args.input)
