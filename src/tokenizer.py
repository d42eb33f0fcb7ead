"""SentencePiece tokenizer: the wrapper, the special ids, and the CLI (`train`,
`encode`, `decode`, `stats`); training itself is in `src.tokenizer_train`.

`decode(encode(s)) == s` for any str that is valid Unicode, because training uses
- byte_fallback: a character missing from the vocab becomes its UTF-8 byte pieces,
  so nothing is ever <unk>;
- identity normalization, remove_extra_whitespaces=False, add_dummy_prefix=False:
  no NFKC, whitespace runs, tabs, CR, NUL and leading spaces are kept as they are.
sentencepiece trains on lines, so no piece contains "\\n": a newline is the byte
piece <0x0A>. It also writes spaces as U+2581 "▁" and decodes every "▁" piece back
to a space, so a literal "▁" in the text would come back as " ": the wrapper
encodes it as its three byte pieces, which decode to "▁" again.
This module imports neither MLX nor torch.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from .corpus import DEFAULT_TEXT_FIELD, FOLDER_SUFFIXES, HubSource, expand_inputs
from .tokens import DataError

# Special tokens; the id of each is its index. pad, unk, bos, eos come first.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))
N_BYTE_PIECES = 256
MIN_VOCAB = len(SPECIAL_TOKENS) + len(CHAT_MARKERS) + N_BYTE_PIECES + 1  # + 1 char
MODEL_FILE, META_FILE = "tokenizer.model", "tokenizer.json"
MODEL_TYPES = ("bpe", "unigram")
DEFAULT_COVERAGE = 0.9995
DEFAULT_MAX_SENTENCES = 1_000_000
MAX_LINE_CHARS = 8192  # longer lines are cut; sentencepiece would skip them
WS = "\u2581"  # sentencepiece's whitespace marker
DEFAULT_HUB_DOCS = 200_000  # rows of a hub dataset read to train a tokenizer


class TokenizerError(ValueError):
    """A missing or unusable tokenizer, or a user mistake when training one."""


class Tokenizer:
    """A trained SentencePiece model with this project's special ids."""

    def __init__(self, sp: spm.SentencePieceProcessor, sha256: str, directory: Path):
        self._sp, self.sha256, self.dir = sp, sha256, directory
        self._threads = os.cpu_count() or 1
        # The byte pieces that spell a literal "▁" (see the module docstring).
        self._ws_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in WS.encode()]

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> Tokenizer:
        """Load from a folder holding tokenizer.model, or from the .model file;
        `encode_batch` uses `threads` threads (default: every core)."""
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise TokenizerError(
                f"{path}: no tokenizer there (expected a folder with {MODEL_FILE}, "
                "made by `python -m src.tokenizer train`)"
            )
        data = model.read_bytes()
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:
            raise TokenizerError(f"{model}: not a sentencepiece model ({e})") from None
        ids = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID) or not sp.is_byte(
            sp.piece_to_id("<0x00>")
        ):
            raise TokenizerError(
                f"{model}: not trained by src.tokenizer (pad/unk/bos/eos ids {ids}, "
                "or no byte fallback)"
            )
        tok = cls(sp, hashlib.sha256(data).hexdigest(), model.parent)
        tok._threads = threads or tok._threads
        return tok

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    # The same for every model this module trains (checked in `load`).
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (a str without lone surrogates), optionally with
        BOS/EOS; chat markers such as "<|user|>" in the text become their ids."""
        if WS in text:
            parts = [self._sp.encode(part) for part in text.split(WS)]
            ids = parts[0]
            for part in parts[1:]:
                ids += self._ws_ids + part
        else:
            ids = self._sp.encode(text)
        return [BOS_ID] * bos + ids + [EOS_ID] * eos

    def encode_batch(
        self, texts: Iterable[str], bos: bool = False, eos: bool = False
    ) -> list[list[int]]:
        """Same as [encode(t) for t in texts], on all cores."""
        texts = list(texts)
        out = self._sp.encode(
            texts, add_bos=bos, add_eos=eos, num_threads=self._threads
        )
        for i, text in enumerate(texts):
            if WS in text:  # rare: take the exact path
                out[i] = self.encode(text, bos, eos)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (a list or array); special tokens decode to ""."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise TokenizerError(f"token id {bad} is outside [0, {self.vocab_size})")
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)


def train_tokenizer(*args, **kwargs) -> Tokenizer:
    """`src.tokenizer_train.train_tokenizer` (kept here for callers and tests)."""
    from .tokenizer_train import train_tokenizer as train

    return train(*args, **kwargs)


# --------------------------------------------------------------------------- CLI


def _positive_int(s: str) -> int:
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return int(s)


def _coverage(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m src.tokenizer",
        description="Train and use a SentencePiece tokenizer (exact round trip).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tr = sub.add_parser(
        "train",
        help="train a tokenizer on text files",
        description="Train on .txt files (one sentence per line; <|endoftext|> "
        "lines are skipped) or .jsonl/.json/.parquet files (the lines of each "
        "row's --text-field) and write DIR/tokenizer.model and DIR/tokenizer.json.",
    )
    add = tr.add_argument
    src = tr.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="files, folders (every .txt, .jsonl and .parquet file below) or globs",
    )
    src.add_argument(
        "--hf-dataset", metavar="NAME", help="a Hugging Face hub dataset (network)"
    )
    add("--hf-config", metavar="C", help="hub dataset config, e.g. sample-10BT")
    add("--hf-split", default="train", metavar="S", help="hub split (default train)")
    add(
        "--max-docs",
        type=_positive_int,
        default=DEFAULT_HUB_DOCS,
        metavar="N",
        help=f"read the first N rows of a hub dataset (default {DEFAULT_HUB_DOCS})",
    )
    add(
        "--text-field",
        default=DEFAULT_TEXT_FIELD,
        metavar="NAME",
        help=f"field of jsonl/parquet rows holding the text (default "
        f"{DEFAULT_TEXT_FIELD})",
    )
    add("--output", required=True, metavar="DIR", help="folder to write")
    add(
        "--vocab-size",
        type=_positive_int,
        required=True,
        metavar="N",
        help=f">= {MIN_VOCAB}",
    )
    add("--model-type", choices=MODEL_TYPES, default="bpe", help="(default bpe)")
    add(
        "--max-sentences",
        type=_positive_int,
        default=DEFAULT_MAX_SENTENCES,
        metavar="N",
        help="train on a seeded random sample of N lines at most "
        f"(default {DEFAULT_MAX_SENTENCES})",
    )
    add("--seed", type=int, default=0, help="seed of the line sample (default 0)")
    add(
        "--character-coverage",
        type=_coverage,
        default=DEFAULT_COVERAGE,
        metavar="F",
        help="share of the text's characters that get a piece of their own; rarer "
        f"ones fall back to byte pieces (default {DEFAULT_COVERAGE})",
    )
    tok_help = "folder made by `train` (or its tokenizer.model)"
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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "train":
            source = args.input
            if args.hf_dataset:
                source = HubSource(args.hf_dataset, args.hf_config, args.hf_split)
            tok = train_tokenizer(
                source,
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
            print(
                f"wrote {tok.dir / MODEL_FILE} (vocab {tok.vocab_size}, sha256 {sha})"
            )
            return 0
        tok = Tokenizer.load(args.tokenizer)
        if args.command == "encode":
            text = sys.stdin.read() if args.text is None else args.text
            print(" ".join(map(str, tok.encode(text, bos=args.bos, eos=args.eos))))
        elif args.command == "decode":
            print(tok.decode(args.ids))
        else:
            from .tokenizer_train import count_tokens

            paths = expand_inputs(args.input, FOLDER_SUFFIXES)
            rows = count_tokens(tok, paths, args.text_field)
            rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
            for name, n, size in rows:
                ratio = f"{size / n:.3f}" if n else "n/a"
                print(f"{name}: {n} tokens, {size} bytes, {ratio} bytes/token")
    except (TokenizerError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
