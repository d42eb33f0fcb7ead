"""Token files, the memmap batch loader, and `prepare` (text files -> token files).

Token file: a 32-byte little-endian header (magic, version, itemsize, n_tokens,
vocab_size, reserved) then the ids (uint16 when vocab_size <= 65536, else uint32).
Training windows start at offsets drawn from `np.random.default_rng([seed, step])`,
so a run's data position is just its step (exact resume). No MLX or torch here.

    python -m src.data prepare --input data/raw/tinystories_train.txt \\
        --tokenizer out/tokenizer --output out/data
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import itertools
import json
import os
import secrets
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

MAGIC = b"SLMTOKS\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIQII")  # magic, version, itemsize, n_tokens, vocab, 0
HEADER_SIZE = HEADER.size  # 32
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
SCAN_CHUNK = 4 * 1024 * 1024  # tokens per np.max when scanning for bad ids
DOC_DELIMITER = "<|endoftext|>"  # a line holding only this ends a document
BINARY_SNIFF = 8192  # a NUL byte in the first 8 KiB marks a binary file (as git)
SPLITS = ("train", "val")


class DataError(ValueError):
    """A user mistake or a damaged file; the message names the file."""


@dataclass(frozen=True)
class TokenFileHeader:
    version: int
    itemsize: int
    n_tokens: int
    vocab_size: int

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.itemsize]


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator:
    """Yield a temp file next to `path`; on a clean exit fsync it and rename it over
    `path`, on an exception delete it: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    try:
        with open(tmp, mode.replace("w", "x"), **text) as f:  # "x": never clobber
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class TokenWriter:
    """Append token chunks to a seekable binary file; `finish` writes the header."""

    def __init__(self, f: BinaryIO, vocab_size: int):
        if not 1 <= vocab_size < 2**32:
            raise ValueError(f"vocab_size must be in [1, 2**32), got {vocab_size}")
        self.f, self.vocab_size, self.n_tokens = f, vocab_size, 0
        self.dtype = DTYPES[2 if vocab_size <= 65536 else 4]
        f.write(bytes(HEADER_SIZE))  # placeholder until the count is known

    def write(self, tokens: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size == 0:
            return
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"tokens must be a 1-D integer array, got {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside [0, {self.vocab_size})")
        self.f.write(arr.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += arr.size

    def finish(self) -> TokenFileHeader:
        h = TokenFileHeader(
            VERSION, self.dtype.itemsize, self.n_tokens, self.vocab_size
        )
        self.f.seek(0)
        self.f.write(HEADER.pack(MAGIC, *astuple(h), 0))
        self.f.seek(0, os.SEEK_END)
        return h


def write_tokens(path: str | Path, tokens, vocab_size: int) -> TokenFileHeader:
    """Write a token file atomically; every id must be in [0, vocab_size)."""
    with atomic_file(path) as f:
        writer = TokenWriter(f, vocab_size)
        writer.write(tokens)
        return writer.finish()


def read_header(path: str | Path) -> TokenFileHeader:
    """Parse and check the header (magic, version, itemsize), not the body."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: token file not found")
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise DataError(f"{path}: {len(raw)} bytes, too short for a token file")
    magic, version, itemsize, n_tokens, vocab_size, _ = HEADER.unpack(raw)
    if magic != MAGIC:
        raise DataError(f"{path}: not a token file (magic {magic!r} != {MAGIC!r})")
    if version != VERSION:
        raise DataError(f"{path}: unsupported version {version} (expected {VERSION})")
    if itemsize not in DTYPES:
        raise DataError(f"{path}: unsupported itemsize {itemsize} (expected 2 or 4)")
    return TokenFileHeader(version, itemsize, n_tokens, vocab_size)


def _check_size(path: Path, h: TokenFileHeader) -> None:
    expected, actual = HEADER_SIZE + h.n_tokens * h.itemsize, path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: the header declares {h.n_tokens} tokens "
            f"({expected} bytes) but the file has {actual} bytes"
        )


def open_tokens(path: str | Path) -> np.ndarray:
    """The token array of a file, memory-mapped read-only (size checked)."""
    path = Path(path)
    h = read_header(path)
    _check_size(path, h)
    if h.n_tokens == 0:  # np.memmap cannot map zero bytes
        return np.empty(0, dtype=h.dtype)
    return np.memmap(path, h.dtype, "r", HEADER_SIZE, (h.n_tokens,))


def validate_token_file(
    path: str | Path, vocab_size: int, context_length: int
) -> TokenFileHeader:
    """Check a token file fully before training; raise DataError naming it."""
    path = Path(path)
    h = read_header(path)
    _check_size(path, h)
    if h.n_tokens == 0:
        raise DataError(f"{path}: empty token file (0 tokens)")
    if h.n_tokens < context_length + 1:
        raise DataError(
            f"{path}: {h.n_tokens} tokens, fewer than context_length + 1 = "
            f"{context_length + 1} needed for one window"
        )
    if h.vocab_size > vocab_size:
        raise DataError(
            f"{path}: written for vocab_size {h.vocab_size}, more than the "
            f"model's {vocab_size} (a different tokenizer?)"
        )
    tokens = open_tokens(path)
    for start in range(0, h.n_tokens, SCAN_CHUNK):
        chunk = tokens[start : start + SCAN_CHUNK]
        top = int(chunk.max())
        if top >= vocab_size:
            pos = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(
                f"{path}: token id {top} >= vocab_size {vocab_size} "
                f"(first out-of-range id at position {pos})"
            )
    return h


class TokenLoader:
    """Random training windows and fixed validation windows of a token file.

    A window is context_length + 1 tokens: inputs w[:-1], targets w[1:].
    """

    def __init__(self, path: str | Path, context_length: int, vocab_size: int):
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.path, self.context_length = Path(path), context_length
        self.header = validate_token_file(self.path, vocab_size, context_length)

    @property
    def n_tokens(self) -> int:
        return self.header.n_tokens

    def _tokens(self) -> np.ndarray:
        # A fresh map per batch: one long-lived np.memmap keeps every touched page
        # resident and RSS grows over a run (the nanoGPT lesson). Mapping is cheap.
        return np.memmap(
            self.path, self.header.dtype, "r", HEADER_SIZE, (self.n_tokens,)
        )

    def batch(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """(batch_size, context_length + 1) int32, a pure function of (seed, step)."""
        if min(seed, step) < 0 or batch_size < 1:
            raise ValueError(f"bad seed {seed}, step {step} or batch_size {batch_size}")
        L = self.context_length
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.n_tokens - L, size=batch_size)  # start+L < n
        return np.asarray(self._tokens()[starts[:, None] + np.arange(L + 1)], np.int32)

    def num_val_windows(self, max_tokens: int | None = None) -> int:
        """Windows needed to cover max_tokens targets (None: the whole file)."""
        available = (self.n_tokens - 1) // self.context_length
        if max_tokens is None:
            return available
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        return min(available, -(-max_tokens // self.context_length))

    def val_batches(
        self, batch_size: int, max_tokens: int | None = None
    ) -> Iterator[np.ndarray]:
        """Windows i = tokens[i*L : i*L+L+1] from the file start, in order, until
        max_tokens targets are covered; the last batch may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        L, n = self.context_length, self.num_val_windows(max_tokens)
        for first in range(0, n, batch_size):
            rows = np.arange(first, min(first + batch_size, n))
            idx = rows[:, None] * L + np.arange(L + 1)
            yield np.asarray(self._tokens()[idx], np.int32)


# ------------------------------------------------------------------ text corpora


def expand_inputs(specs: Iterable[str | Path]) -> list[Path]:
    """Files, folders (every *.txt below, sorted) and globs -> unique file paths."""
    paths: dict[Path, None] = {}
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not found:
                raise DataError(f"{p}: folder holds no .txt files")
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


def iter_lines(path: Path) -> Iterator[tuple[str, int]]:
    """Yield (line without \\n or \\r\\n, its raw byte length) of a UTF-8 file;
    DataError naming the file for binary or non-UTF-8 content."""
    with open(path, "rb") as f:
        if b"\x00" in f.read(BINARY_SNIFF):
            raise DataError(f"{path}: looks like a binary file (NUL bytes), not text")
        f.seek(0)
        offset = 0
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                where = offset + e.start
                raise DataError(
                    f"{path}: not UTF-8 text (bad byte at {where})"
                ) from None
            if offset == 0:
                line = line.removeprefix("\ufeff")  # a byte order mark is no text
            offset += len(raw)
            if line.endswith("\n"):
                line = line[:-2] if line.endswith("\r\n") else line[:-1]
            yield line, len(raw)


def iter_documents(
    path: Path, delimiter: str = DOC_DELIMITER
) -> Iterator[tuple[str, int]]:
    """Yield (stripped document, bytes consumed) of one file; documents may be "".

    delimiter: a line holding only this text ends a document; "blank": blank lines
    separate documents; "none": the whole file is one document.
    """
    lines: list[str] = []
    nbytes = 0
    for line, n in iter_lines(path):
        nbytes += n
        s = line.strip()
        if delimiter == "blank":
            boundary = not s
        else:
            boundary = delimiter != "none" and s == delimiter
        if boundary:
            yield "\n".join(lines).strip(), nbytes
            lines, nbytes = [], 0
        else:
            lines.append(line)
    yield "\n".join(lines).strip(), nbytes


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


def split_of(text: str, val_fraction: float) -> tuple[str, bytes]:
    """(split, sha1) of a document: the split depends on its text only."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    val = int.from_bytes(digest[:8], "big") < val_fraction * 2**64
    return ("val" if val else "train"), digest


def prepare_dataset(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    output: str | Path,
    delimiter: str = DOC_DELIMITER,
    val_fraction: float = 0.1,
    max_docs: int | None = None,
    batch_docs: int = 1024,
) -> dict:
    """Text files -> output/{train,val}.bin and meta.json; returns the meta.

    Documents are stripped, empty ones skipped, exact duplicates dropped; each goes
    to train or val by the sha1 of its text and is followed by EOS.
    """
    from .tokenizer import Tokenizer  # the tokenizer module imports this one

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val fraction must be in (0, 1), got {val_fraction}")
    if max_docs is not None and max_docs < 1:
        raise DataError(f"max docs must be >= 1, got {max_docs}")
    tok = Tokenizer.load(tokenizer)
    paths = expand_inputs(inputs)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # never a stale meta beside new bins
    seen: set[bytes] = set()
    docs, duplicates = dict.fromkeys(SPLITS, 0), 0
    pending: list[tuple[str, str]] = []
    with contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(atomic_file(out / f"{s}.bin")) for s in SPLITS}
        writers = {s: TokenWriter(f, tok.vocab_size) for s, f in files.items()}

        def flush() -> None:
            encoded = tok.encode_batch([text for _, text in pending])
            for s in SPLITS:
                ids = [
                    e + [tok.eos_id]
                    for (d, _), e in zip(pending, encoded, strict=True)
                    if d == s
                ]
                n = sum(map(len, ids))
                writers[s].write(np.fromiter(itertools.chain(*ids), np.int64, n))
            pending.clear()

        total = sum(p.stat().st_size for p in paths)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare")
        stack.enter_context(bar)
        stream = (doc for p in paths for doc in iter_documents(p, delimiter))
        for text, nbytes in stream:
            bar.update(nbytes)
            if max_docs is not None and len(seen) >= max_docs:
                break
            if not text:
                continue
            split, digest = split_of(text, val_fraction)
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            docs[split] += 1
            pending.append((split, text))
            if len(pending) >= batch_docs:
                flush()
        flush()
        for s, name in (("train", "training"), ("val", "validation")):
            if docs[s] == 0:
                raise DataError(
                    f"the {name} split is empty ({len(seen)} unique documents, val "
                    f"fraction {val_fraction}): use more text or check --delimiter"
                )
        headers = {s: w.finish() for s, w in writers.items()}
    meta = {
        "format_version": VERSION,
        "tokenizer": {
            "dir": str(tok.dir),
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
        },
        "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in paths],
        "delimiter": delimiter,
        "val_fraction": val_fraction,
        "max_docs": max_docs,
        "duplicates_dropped": duplicates,
        "splits": {
            s: {"file": f"{s}.bin", "docs": docs[s], **asdict(headers[s])}
            for s in SPLITS
        },
    }
    with atomic_file(out / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def download_tinystories(
    output: str | Path,
    dataset: str = "roneneldan/TinyStories",
    split: str = "train",
    max_docs: int | None = None,
) -> int:
    """Stream a Hugging Face text dataset into a .txt file with a DOC_DELIMITER line
    after each document; returns the number of documents."""
    try:
        import datasets  # heavy, and only needed here
    except ImportError:
        raise DataError(
            "download needs the `datasets` package (pip install datasets)"
        ) from None
    n = 0
    try:
        rows = datasets.load_dataset(dataset, split=split, streaming=True)
        with atomic_file(output, "w") as f, tqdm(unit=" docs", desc="download") as bar:
            for row in rows:
                if "text" not in row:
                    raise DataError(
                        f"{dataset}: rows have no 'text' field ({sorted(row)})"
                    )
                if text := row["text"].strip():
                    f.write(f"{text}\n{DOC_DELIMITER}\n")
                    n += 1
                    bar.update()
                if max_docs is not None and n >= max_docs:
                    break
    except DataError:
        raise
    except Exception as e:  # offline shows as ConnectionError, OSError, hub errors...
        raise DataError(
            f"could not download {dataset} (split {split!r}): {type(e).__name__}: {e}\n"
            f"  offline? copy a TinyStories .txt file (stories separated by "
            f"{DOC_DELIMITER} lines) to {output}, or pass --data PATH"
        ) from e
    if n == 0:
        raise DataError(f"{dataset} (split {split!r}) gave no documents")
    return n


# -------------------------------------------------------------------------- CLI


def _positive_int(s: str) -> int:
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return int(s)


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {s!r}")
    return v


DELIMITER_HELP = (
    f"a line holding only this text ends a document (default {DOC_DELIMITER}); "
    "'blank': blank lines separate documents; 'none': one document per file"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m src.data",
        description="Turn text corpora into token files for training.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pre = sub.add_parser(
        "prepare",
        help="tokenize .txt files into train.bin, val.bin and meta.json",
        description="Split text into documents, drop empty and duplicate ones, put "
        "each in train or val by a hash of its text (the same document always "
        "lands on the same side), and write each split's tokens, EOS after every "
        "document.",
    )
    add = pre.add_argument
    add(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help=".txt files, folders (every *.txt below) or globs",
    )
    add("--tokenizer", required=True, metavar="DIR", help="from src.tokenizer train")
    add("--output", required=True, metavar="DIR", help="folder for the token files")
    add("--delimiter", default=DOC_DELIMITER, help=DELIMITER_HELP)
    add(
        "--val-fraction",
        type=_fraction,
        default=0.1,
        metavar="F",
        help="share of documents for validation (default 0.1)",
    )
    add(
        "--max-docs", type=_positive_int, metavar="N", help="keep the first N documents"
    )
    loc = sub.add_parser(
        "locate",
        help="print the corpus files to use, one per line",
        description="Print the files --data names, or else the TinyStories file "
        "found in data/raw/ or ../shared/data/ (what the quick start trains on).",
    )
    loc.add_argument("--data", metavar="PATH", help="a .txt file, folder or glob")
    dl = sub.add_parser(
        "download",
        help="stream TinyStories from the Hugging Face hub into a .txt file",
        description=f"Needs network. Writes each story, then a line {DOC_DELIMITER}.",
    )
    add = dl.add_argument
    add(
        "--output", required=True, metavar="FILE", help="data/raw/tinystories_train.txt"
    )
    add("--dataset", default="roneneldan/TinyStories", help="hub dataset id")
    add("--split", default="train", help="dataset split (default train)")
    add("--max-docs", type=_positive_int, metavar="N", help="stop after N documents")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .tokenizer import TokenizerError  # the tokenizer module imports this one

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "prepare":
            opts = (args.delimiter, args.val_fraction, args.max_docs)
            meta = prepare_dataset(args.input, args.tokenizer, args.output, *opts)
            for s, info in meta["splits"].items():
                out = Path(args.output) / info["file"]
                print(f"{s}: {info['docs']} docs, {info['n_tokens']} tokens -> {out}")
            print(f"duplicates dropped: {meta['duplicates_dropped']}")
        elif args.command == "locate":
            print("\n".join(str(p) for p in find_corpus(args.data)))
        else:
            n = download_tinystories(
                args.output, args.dataset, args.split, args.max_docs
            )
            print(f"wrote {n} documents to {args.output}")
    except (DataError, TokenizerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
