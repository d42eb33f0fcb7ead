"""`python -m src.tokenizer`: train a tokenizer, encode, decode, and count tokens.

    python -m src.tokenizer train --input data/raw/ --output data/tokenizer \\
        --vocab-size 4096
    python -m src.tokenizer encode --tokenizer data/tokenizer --text "Once upon a time"
    python -m src.tokenizer stats --tokenizer data/tokenizer --input valid.txt
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence

from tqdm import tqdm

from .. import cli
from ..corpus.records import skipped_summary
from ..corpus.sources import (
    DEFAULT_TEXT_FIELD,
    ReadOptions,
    Source,
    add_source_args,
    open_sources,
    sources_from_args,
)
from ..errors import TokenizerError, utf8_problem
from .kinds import TokenizerLike, load_tokenizer
from .spm import MAX_VOCAB, MIN_VOCAB, MODEL_FILE
from .training import (
    DEFAULT_COVERAGE,
    DEFAULT_HUB_DOCS,
    DEFAULT_MAX_SENTENCES,
    MIN_COVERAGE,
    MODEL_TYPES,
    train_tokenizer,
)

COVERAGE = cli.number_in(MIN_COVERAGE, 1.0)  # --character-coverage


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=cli.program("src.tokenizer"),
        description="Train and use a SentencePiece tokenizer (exact round trip).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tr = sub.add_parser(
        "train",
        help="train a tokenizer on text files",
        description="Train on .txt files (one sentence per line; <|endoftext|> "
        "lines are skipped) or .jsonl/.json/.parquet files (the lines of each "
        "row's --text-field) and write DIR/tokenizer.model and "
        "DIR/tokenizer_info.json.",
    )
    add = tr.add_argument
    add_source_args(
        tr,
        text_field_help=f"field of jsonl/parquet/hub rows holding the text "
        f"(default {DEFAULT_TEXT_FIELD})",
    )
    add(
        "--max-docs",
        type=cli.positive_int,
        default=DEFAULT_HUB_DOCS,
        metavar="N",
        help=f"read the first N rows of a hub dataset (default {DEFAULT_HUB_DOCS})",
    )
    add("--output", required=True, metavar="DIR", help="folder to write")
    add(
        "--vocab-size",
        type=cli.positive_int,
        required=True,
        metavar="N",
        help=f"in [{MIN_VOCAB}, {MAX_VOCAB}]",
    )
    add("--model-type", choices=MODEL_TYPES, default="bpe", help="(default bpe)")
    add(
        "--max-sentences",
        type=cli.positive_int,
        default=DEFAULT_MAX_SENTENCES,
        metavar="N",
        help="train on a seeded random sample of N lines at most "
        f"(default {DEFAULT_MAX_SENTENCES})",
    )
    add(
        "--seed",
        type=cli.count,
        default=0,
        help="seed of the line sample, >= 0 (default 0)",
    )
    add(
        "--character-coverage",
        type=COVERAGE,
        default=DEFAULT_COVERAGE,
        metavar="F",
        help="share of the text's characters that get a piece of their own; rarer "
        f"ones fall back to byte pieces; in [{MIN_COVERAGE}, 1] "
        f"(default {DEFAULT_COVERAGE})",
    )
    tok_help = (
        "folder made by `train` (or its tokenizer.model), or a Hugging Face "
        "tokenizer folder (tokenizer.json)"
    )
    enc = sub.add_parser("encode", help="print the token ids of a text")
    enc.add_argument("--tokenizer", required=True, metavar="DIR", help=tok_help)
    enc.add_argument("--text", help="text to encode (default: read stdin)")
    enc.add_argument("--bos", action="store_true", help="prepend BOS")
    enc.add_argument("--eos", action="store_true", help="append EOS")
    dec = sub.add_parser("decode", help="print the text of token ids")
    dec.add_argument("--tokenizer", required=True, metavar="DIR", help=tok_help)
    dec.add_argument("--ids", type=int, nargs="+", required=True, metavar="ID")
    st = sub.add_parser("stats", help="tokens, bytes and bytes per token of files")
    st.add_argument("--tokenizer", required=True, metavar="DIR", help=tok_help)
    st.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help=".txt (the whole file), .jsonl/.json/.parquet (the texts) files",
    )
    st.add_argument("--text-field", default=DEFAULT_TEXT_FIELD, metavar="NAME")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli.command(build_parser(), argv, run)


def run(args: argparse.Namespace) -> None:
    if args.command == "train":
        tok = train_tokenizer(
            sources_from_args(args),
            args.output,
            args.vocab_size,
            model_type=args.model_type,
            max_sentences=args.max_sentences,
            seed=args.seed,
            character_coverage=args.character_coverage,
            text_field=args.text_field,
            max_docs=args.max_docs if args.hf_dataset else None,
        )
        sha = tok.sha256[:12]
        print(f"wrote {tok.dir / MODEL_FILE} (vocab {tok.vocab_size}, sha256 {sha})")
        return
    tok = load_tokenizer(args.tokenizer)
    if args.command == "encode":
        text = read_stdin() if args.text is None else args.text
        if why := utf8_problem(text):
            raise TokenizerError(f"--text: {why}")
        print(" ".join(map(str, tok.encode(text, bos=args.bos, eos=args.eos))))
    elif args.command == "decode":
        print(tok.decode(args.ids))
    else:
        rows = count_tokens(tok, open_sources(args.input), args.text_field)
        rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
        for name, n, size in rows:
            ratio = f"{size / n:.3f}" if n else "n/a"
            print(f"{name}: {n} tokens, {size} bytes, {ratio} bytes/token")


def read_stdin() -> str:
    """All of stdin, decoded strictly (Python's own stdin would keep an invalid
    byte as a lone surrogate, or raise mid-read)."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(
            f"stdin: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start})"
        ) from None


# ------------------------------------------------------------------- stats


def _line_chunks(f, n: int) -> list[bytes]:
    return [b"".join(f.readlines(1 << 20)) for _ in range(n)]  # whole lines, ~1 MiB


def _count_records(tok: TokenizerLike, source: Source, text_field: str):
    """(tokens, UTF-8 bytes) of the texts of a record source."""
    n = nbytes = 0
    opts = ReadOptions(text_field=text_field)
    texts = (text for text, _ in source.documents(opts))
    while batch := list(itertools.islice(texts, 256)):
        n += sum(map(len, tok.encode_batch(batch)))
        nbytes += sum(len(t.encode("utf-8")) for t in batch)
    if line := skipped_summary(opts.skipped, text_field):  # never dropped unsaid
        tqdm.write(f"warning: {source}: {line}", file=sys.stderr)
    return n, nbytes


def count_tokens(
    tok: TokenizerLike, sources: list[Source], text_field: str = DEFAULT_TEXT_FIELD
) -> list[tuple[str, int, int]]:
    """(name, tokens, bytes) of each local file: .txt files encoded in chunks of
    whole lines (no piece holds a newline, so for BPE this equals encoding the file
    in one go; a unigram Viterbi may break rare float ties differently, +-1), and
    the texts of jsonl/parquet files (bytes: of the texts, not of the JSON)."""
    rows = []
    total = sum(source.size for source in sources)
    with tqdm(total=total, unit="B", unit_scale=True, desc="encode") as bar:
        for source in sources:
            if source.records:
                rows.append((str(source), *_count_records(tok, source, text_field)))
                bar.update(source.size)
                continue
            n = 0  # of the raw text, delimiter lines and all (not its documents)
            with open(source.path, "rb") as f:
                while chunks := [c for c in _line_chunks(f, 16) if c]:
                    try:
                        texts = [c.decode("utf-8") for c in chunks]
                    except UnicodeDecodeError:
                        raise TokenizerError(f"{source}: not UTF-8 text") from None
                    n += sum(map(len, tok.encode_batch(texts)))
                    bar.update(sum(map(len, chunks)))
            rows.append((str(source), n, source.size))
    return rows
