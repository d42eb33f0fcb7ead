"""Text corpora -> token files: corpus discovery and reading, `prepare`, `download`,
`locate` and their CLI. The token-file format and the loader are in `src.tokens`.

Documents go to train or val by the sha1 of their text; each is followed by EOS.

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
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .tokens import VERSION, DataError, TokenWriter, atomic_file

DOC_DELIMITER = "<|endoftext|>"  # a line holding only this ends a document
BINARY_SNIFF = 8192  # a NUL byte in the first 8 KiB marks a binary file (as git)
SPLITS = ("train", "val")


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
