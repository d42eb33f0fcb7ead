"""The data CLI: `prepare`, `split`, `stats`, `locate` and `download`.

Reading sources is `src.corpus`, filtering/encoding/splitting `src.data.prepare`,
the token-file format `src.data.tokens` and its loader `src.data.loader`. No MLX or torch here.

    python -m src.data prepare --input data/raw/tinystories_train.txt \\
        --tokenizer data/tokenizer --output data/tinystories
    python -m src.data prepare --hf-dataset HuggingFaceFW/fineweb-edu \\
        --hf-config sample-10BT --max-tokens 100000000 \\
        --tokenizer data/tokenizer --output data/fineweb
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .. import cli
from ..corpus.records import skipped_summary
from ..corpus.sources import (
    DEFAULT_TEXT_FIELD,
    add_source_args,
    find_corpus,
    sources_from_args,
)
from ..corpus.text import DOC_DELIMITER
from ..errors import DataError
from ..tokenizer.spm import EOS_ID
from .documents import DEFAULT_MAX_REPETITION, DEFAULT_MIN_WORDS, QualityFilter
from .download import download_tinystories
from .interrupts import Interrupted, held, unwinding
from .masks import is_mask_file
from .prepare import prepare_dataset, split_token_file, token_stats
from .tokens import DATASET_META

_fraction = cli.number_in(0.0, 1.0, lo_open=True, hi_open=True)
_share = cli.number_in(0.0, 1.0)


DELIMITER_HELP = (
    f".txt files: a line holding only this text ends a document (default "
    f"{DOC_DELIMITER}); 'blank': blank lines separate documents; 'none': one "
    "document per file"
)
PREPARE_DESCRIPTION = """\
Read documents, drop empty, too short, highly repetitive and exactly duplicated
ones (counted in meta.json), put each in train or val by a hash of its text (the
same document always lands on the same side, whatever the input order), and write
OUTPUT/train.bin, OUTPUT/val.bin and OUTPUT/meta.json, EOS after every document.

sources (one of):
  --input PATH...   .txt (documents split by --delimiter), .jsonl/.json (one JSON
                    object per line, text in --text-field) and .parquet files,
                    folders (every such file below) or globs
  --hf-dataset NAME a Hugging Face hub dataset, streamed (needs network), e.g.
                    roneneldan/TinyStories; HuggingFaceFW/fineweb-edu with
                    --hf-config sample-10BT; Skylion007/openwebtext
"""


def _add_prepare(sub) -> None:
    pre = sub.add_parser(
        "prepare",
        help="tokenize documents into train.bin, val.bin and meta.json",
        description=PREPARE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = pre.add_argument
    add_source_args(
        pre,
        text_field_default=None,  # "text", or "messages" with --chat
        text_field_help=f"field holding the text in jsonl/parquet/hub rows (default "
        f"{DEFAULT_TEXT_FIELD}; with --chat, messages)",
    )
    add("--tokenizer", required=True, metavar="DIR", help="from src.tokenizer "
        "train, or a Hugging Face tokenizer/model folder (tokenizer.json)")  # fmt: skip
    add("--output", required=True, metavar="DIR", help="folder for the token files")
    add("--delimiter", default=DOC_DELIMITER, help=DELIMITER_HELP)
    add(
        "--chat",
        action="store_true",
        help="rows hold conversations (a list of {role, content} messages, the "
        "Hugging Face chat layout): render each in the chat template "
        "(<|system|>/<|user|>/<|assistant|>/<|end|>) and mark the data, so models "
        "trained on it chat in that template; also writes which tokens are the "
        "assistant's (train.mask.bin, val.mask.bin), so training counts only the "
        "replies (training.loss_on)",
    )
    add(
        "--val-fraction",
        type=_fraction,
        default=0.1,
        metavar="F",
        help="share of documents for validation (default 0.1)",
    )
    add("--max-docs", type=cli.positive_int, metavar="N", help="keep N documents")
    add(
        "--max-tokens",
        type=cli.positive_int,
        metavar="N",
        help="stop once N tokens are written (whole documents)",
    )
    add(
        "--min-words",
        type=cli.count,
        default=DEFAULT_MIN_WORDS,
        metavar="N",
        help=f"drop documents with fewer words (default {DEFAULT_MIN_WORDS}; 0: off)",
    )
    add(
        "--max-repetition",
        type=_share,
        default=DEFAULT_MAX_REPETITION,
        metavar="F",
        help="drop documents whose share of repeated characters (repeated lines, "
        "or repeats of the most frequent word pair) exceeds F (default "
        f"{DEFAULT_MAX_REPETITION}; 1: off)",
    )
    add("--bos", action="store_true", help="also put BOS before every document")
    add(
        "--workers",
        type=cli.positive_int,
        metavar="N",
        help="processes that read, filter and encode (default: one per core; the "
        "output is the same for any N)",
    )


EOS_HELP = "the EOS id (default: the one meta.json beside the file names, else 3)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=cli.program("src.data"),
        description="Turn text corpora into token files for training.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(sub)
    sp = sub.add_parser(
        "split",
        help="split an existing token file by index into train.bin and val.bin",
        description="The first part of FILE becomes OUTPUT/train.bin, the last "
        "part OUTPUT/val.bin (plus meta.json). The cut moves forward to the next "
        "document boundary (EOS) unless --exact.",
    )
    add = sp.add_argument
    add("--input", required=True, metavar="FILE", help="a token file")
    add("--output", required=True, metavar="DIR", help="folder to write")
    how = sp.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--val-fraction", type=_fraction, metavar="F", help="share of tokens for val"
    )
    how.add_argument(
        "--val-tokens", type=cli.positive_int, metavar="N", help="tokens for val"
    )
    add("--exact", action="store_true", help="cut exactly, even inside a document")
    add("--eos-id", type=cli.count, metavar="ID", help=EOS_HELP)
    st = sub.add_parser(
        "stats",
        help="print the header, documents and size of token files",
        description="For each token file (or folder of *.bin): tokens, dtype, "
        "vocab size, documents (EOS count) and the largest id, as JSON lines.",
    )
    st.add_argument("paths", nargs="+", metavar="PATH", help="token files or folders")
    st.add_argument("--eos-id", type=cli.count, metavar="ID", help=EOS_HELP)
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
    add("--max-docs", type=cli.positive_int, metavar="N", help="stop after N documents")
    add(
        "--text-field",
        default=DEFAULT_TEXT_FIELD,
        metavar="NAME",
        help=f"field of the rows holding the text (default {DEFAULT_TEXT_FIELD})",
    )
    return p


def _prepare(args) -> None:
    sources = sources_from_args(args)
    text_field = args.text_field or ("messages" if args.chat else DEFAULT_TEXT_FIELD)
    quality = QualityFilter(args.min_words, args.max_repetition)
    start = time.perf_counter()
    meta = prepare_dataset(
        sources,
        args.tokenizer,
        args.output,
        delimiter=args.delimiter,
        val_fraction=args.val_fraction,
        max_docs=args.max_docs,
        max_tokens=args.max_tokens,
        text_field=text_field,
        quality=quality,
        bos=args.bos,
        workers=args.workers,
        chat=args.chat,
    )
    secs = time.perf_counter() - start
    with held():  # committed: a signal now only ends the command
        for s, info in meta["splits"].items():
            out = Path(args.output) / info["file"]
            print(f"{s}: {info['docs']} docs, {info['n_tokens']} tokens -> {out}")
        print("dropped: " + ", ".join(f"{n} {k}" for k, n in meta["dropped"].items()))
        print(f"duplicates dropped: {meta['duplicates_dropped']}")
        for s, info in meta["splits"].items():
            if "mask_file" in info:
                n, total = info["assistant_tokens"], max(info["n_tokens"], 1)
                out = Path(args.output) / info["mask_file"]
                print(f"{s}: {n} assistant tokens ({n / total:.0%}) -> {out}")
        if skipped := skipped_summary(meta["skipped_rows"], text_field):
            print(skipped)
        n = sum(info["n_tokens"] for info in meta["splits"].values())
        print(
            f"encoded {n:,} tokens in {secs:.2f} s ({n / secs:,.0f} tokens/s, "
            f"--workers {meta['workers']})"
        )


def _eos_id(given: int | None, token_file: Path) -> int:
    """--eos-id, else the EOS id that the meta.json beside `token_file` records
    (a Hugging Face tokenizer's), else our SentencePiece tokenizer's."""
    if given is not None:
        return given
    try:
        meta = json.loads((token_file.parent / DATASET_META).read_text("utf-8"))
        eos = meta["tokenizer"]["eos_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return EOS_ID
    return eos if isinstance(eos, int) and not isinstance(eos, bool) else EOS_ID


def _stats(args) -> None:
    for spec in args.paths:
        p = Path(spec)
        files = (
            sorted(f for f in p.glob("*.bin") if not is_mask_file(f))
            if p.is_dir()
            else [p]
        )
        if not files:
            raise DataError(f"{p}: folder holds no .bin token files")
        for f in files:
            print(json.dumps(token_stats(f, _eos_id(args.eos_id, f))))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.command(build_parser(), argv, run)


def run(args: argparse.Namespace) -> int:
    """Run a command; SIGINT and SIGTERM unwind it (temp files deleted, workers
    stopped) and end it with 128 + the signal's number."""
    try:
        with unwinding():
            _run(args)
    except Interrupted as stop:
        output = getattr(args, "output", None)
        if output is None:
            where = ""
        elif stop.committed:
            where = f" after {output} was written"
        else:
            where = f"; {output} is as it was"
        print(f"interrupted by {stop.name}{where}", file=sys.stderr)
        return 128 + stop.signum
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.command == "prepare":
        _prepare(args)
    elif args.command == "split":
        meta = split_token_file(
            args.input,
            args.output,
            args.val_fraction,
            args.val_tokens,
            None if args.exact else _eos_id(args.eos_id, Path(args.input)),
        )
        with held():  # committed: a signal now only ends the command
            for s, info in meta["splits"].items():
                out = Path(args.output) / info["file"]
                print(f"{s}: {info['n_tokens']} tokens -> {out}")
    elif args.command == "stats":
        _stats(args)
    elif args.command == "locate":
        print("\n".join(str(p) for p in find_corpus(args.data)))
    else:
        skipped: Counter = Counter()
        n = download_tinystories(
            args.output,
            args.dataset,
            args.split,
            args.max_docs,
            args.text_field,
            skipped,
        )
        with held():  # committed: a signal now only ends the command
            print(f"wrote {n} documents to {args.output}")
            if line := skipped_summary(skipped, args.text_field):
                print(line)
