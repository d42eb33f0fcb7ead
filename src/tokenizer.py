"""SentencePiece tokenizer: training for an exact round trip, and a thin wrapper.

`decode(encode(s)) == s` for any str that is valid Unicode, because training uses
- byte_fallback: a character missing from the vocab becomes its UTF-8 byte pieces,
  so nothing is ever <unk>;
- identity normalization, remove_extra_whitespaces=False, add_dummy_prefix=False:
  no NFKC, whitespace runs, tabs, CR, NUL and leading spaces are kept as they are.
sentencepiece trains on lines, so no piece contains "\\n": a newline is the byte
piece <0x0A>. It also writes spaces as U+2581 "▁" and decodes every "▁" piece back
to a space, so a literal "▁" in the text would come back as " ": the wrapper
encodes it as its three byte pieces, which decode to "▁" again.

Line sampling (--max-sentences) is done here with a seeded reservoir:
sentencepiece's own input_sentence_size sampling uses a fixed internal seed, and
`set_random_generator_seed` only takes effect for the first training in a
process. With input_sentence_size=0 its training is deterministic.

character_coverage defaults to 0.9995, not 1.0: with byte fallback no character is
ever lost, so coverage only decides which rare characters get a vocab slot of their
own. 1.0 would spend slots of a small vocab on every stray emoji or CJK character
(and can exceed a small --vocab-size on noisy text); those cost 2-4 byte tokens.
This module imports neither MLX nor torch.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from .data import DOC_DELIMITER, expand_inputs, iter_lines
from .tokens import DataError, atomic_file

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
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a folder holding tokenizer.model, or from the .model file."""
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
        return cls(sp, hashlib.sha256(data).hexdigest(), model.parent)

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


# ---------------------------------------------------------------------- training


def _sample_lines(paths: list[Path], max_sentences: int, seed: int):
    """Read every line once (checking the files), keep a seeded uniform sample of
    at most max_sentences; return (sample, corpus description)."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen, has_text, files = 0, False, []
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="read corpus") as bar:
        for path in paths:
            for line, nbytes in iter_lines(path):
                bar.update(nbytes)
                if not line or line.strip() == DOC_DELIMITER:
                    continue
                has_text = has_text or not line.isspace()
                for start in range(0, len(line), MAX_LINE_CHARS):
                    seen += 1
                    piece = line[start : start + MAX_LINE_CHARS]
                    if len(sample) < max_sentences:
                        sample.append(piece)
                    elif (j := rng.randrange(seen)) < max_sentences:
                        sample[j] = piece  # reservoir sampling (Algorithm R)
            files.append({"path": str(path), "bytes": path.stat().st_size})
    names = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    if not seen:
        raise TokenizerError(f"the corpus is empty: no text lines in {names}")
    if not has_text:
        raise TokenizerError(f"the corpus holds only whitespace: {names}")
    corpus = {"files": files, "bytes": total, "lines": seen, "sampled": len(sample)}
    return sample, corpus


def _explain(message: str, vocab_size: int, coverage: float) -> str:
    """Turn sentencepiece's internal errors into advice in user terms."""
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        need, chars = int(m[1]), int(m[1]) - MIN_VOCAB + 1
        return (
            f"--vocab-size {vocab_size} is too small for this corpus: it needs at "
            f"least {need} ({MIN_VOCAB - 1} special and byte pieces + {chars} "
            f"characters at --character-coverage {coverage}); raise --vocab-size "
            "or lower --character-coverage"
        )
    if m := re.search(r"[Vv]ocabulary size (?:is )?too high.*?<=\s*(\d+)", message):
        return (
            f"--vocab-size {vocab_size} is too large for this corpus: it supports at "
            f"most {m[1]} pieces; use --vocab-size {m[1]} or less, or a larger corpus"
        )
    return f"sentencepiece failed: {message.strip()}"


def train_tokenizer(
    inputs: Sequence[str | Path],
    output: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    seed: int = 0,
    character_coverage: float = DEFAULT_COVERAGE,
) -> Tokenizer:
    """Train on text files (each line is a sentence; `<|endoftext|>` lines are
    skipped) and write output/tokenizer.model and output/tokenizer.json."""
    if vocab_size < MIN_VOCAB:
        raise TokenizerError(
            f"--vocab-size {vocab_size} is too small: the minimum is {MIN_VOCAB} "
            f"({len(SPECIAL_TOKENS) + len(CHAT_MARKERS)} special tokens + "
            f"{N_BYTE_PIECES} byte pieces + the corpus's characters)"
        )
    if model_type not in MODEL_TYPES:
        raise TokenizerError(
            f"model type must be one of {MODEL_TYPES}, got {model_type!r}"
        )
    if not 0.0 < character_coverage <= 1.0 or max_sentences < 1 or seed < 0:
        raise TokenizerError(
            "need 0 < character_coverage <= 1, max_sentences >= 1, seed >= 0"
        )
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"{out}: exists and is not a folder")
    sample, corpus = _sample_lines(expand_inputs(inputs), max_sentences, seed)
    print(f"training {model_type} on {len(sample)} lines...", file=sys.stderr)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=writer,
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,  # e.g. indentation as one piece
            split_digits=True,  # numbers digit by digit: helps small models
            max_sentence_length=4 * MAX_LINE_CHARS,  # bytes
            input_sentence_size=0,  # sampled above, with our seed
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece=SPECIAL_TOKENS[PAD_ID],
            unk_piece=SPECIAL_TOKENS[UNK_ID],
            bos_piece=SPECIAL_TOKENS[BOS_ID],
            eos_piece=SPECIAL_TOKENS[EOS_ID],
            user_defined_symbols=list(CHAT_MARKERS),
            num_threads=os.cpu_count() or 1,
            minloglevel=2,  # errors only; they come back as RuntimeError
        )
    except RuntimeError as e:
        raise TokenizerError(_explain(str(e), vocab_size, character_coverage)) from None
    model = writer.getvalue()
    meta = {
        "sentencepiece_version": spm.__version__,
        "model_type": model_type,
        "vocab_size": vocab_size,
        "sha256": hashlib.sha256(model).hexdigest(),
        "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS + CHAT_MARKERS)},
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "byte_fallback": True,
        "normalization": "identity",
        "character_coverage": character_coverage,
        "seed": seed,
        "max_sentences": max_sentences,
        "corpus": corpus,
    }
    with atomic_file(out / MODEL_FILE) as f:
        f.write(model)
    with atomic_file(out / META_FILE, "w") as f:
        json.dump(meta, f, indent=2)
    return Tokenizer.load(out)


def _line_chunks(f, n: int) -> list[bytes]:
    return [b"".join(f.readlines(1 << 20)) for _ in range(n)]  # whole lines, ~1 MiB


def count_tokens(tok: Tokenizer, paths: list[Path]) -> list[tuple[Path, int, int]]:
    """(path, tokens, bytes) of each file, encoded in chunks of whole lines. No
    piece holds a newline, so for BPE this equals encoding the file in one go (a
    unigram Viterbi may break rare float ties differently, same count or +-1)."""
    rows = []
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="encode") as bar:
        for path in paths:
            n = 0
            with open(path, "rb") as f:
                while chunks := [c for c in _line_chunks(f, 16) if c]:
                    try:
                        texts = [c.decode("utf-8") for c in chunks]
                    except UnicodeDecodeError:
                        raise TokenizerError(f"{path}: not UTF-8 text") from None
                    n += sum(map(len, tok.encode_batch(texts)))
                    bar.update(sum(map(len, chunks)))
            rows.append((path, n, path.stat().st_size))
    return rows


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
        "lines are skipped) and write DIR/tokenizer.model and DIR/tokenizer.json.",
    )
    add = tr.add_argument
    add(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help=".txt files, folders (every *.txt below) or globs",
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
    st.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "train":
            opts = (args.model_type, args.max_sentences, args.seed)
            tok = train_tokenizer(
                args.input, args.output, args.vocab_size, *opts, args.character_coverage
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
            rows = count_tokens(tok, expand_inputs(args.input))
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
