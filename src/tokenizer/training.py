"""Training a SentencePiece tokenizer (exact round trip, fixed special ids; see
`src.tokenizer.spm`) on a corpus. No MLX or torch here.

Line sampling (--max-sentences) is done here with a seeded reservoir:
sentencepiece's own input_sentence_size sampling uses a fixed internal seed, and
`set_random_generator_seed` only takes effect for the first training in a
process. With input_sentence_size=0 its training is deterministic.

character_coverage defaults to 0.9995, not 1.0: with byte fallback no character is
ever lost, so coverage only decides which rare characters get a vocab slot of their
own. 1.0 would spend slots of a small vocab on every stray emoji or CJK character
(and can exceed a small --vocab-size on noisy text); those cost 2-4 byte tokens.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from ..corpus.records import skipped_summary
from ..corpus.sources import (
    DEFAULT_TEXT_FIELD,
    ReadOptions,
    Source,
    open_sources,
)
from ..corpus.text import DOC_DELIMITER
from ..errors import TokenizerError
from ..files import atomic_file
from .spm import (
    BOS_ID,
    CHAT_MARKERS,
    EOS_ID,
    INFO_FILE,
    LEGACY_INFO_FILE,
    MAX_VOCAB,
    MIN_VOCAB,
    MODEL_FILE,
    N_BYTE_PIECES,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
    legacy_info,
)

MODEL_TYPES = ("bpe", "unigram")
DEFAULT_COVERAGE = 0.9995
MIN_COVERAGE = 0.98  # sentencepiece refuses less
DEFAULT_MAX_SENTENCES = 1_000_000
MAX_LINE_CHARS = 8192  # longer lines are cut; sentencepiece would skip them
DEFAULT_HUB_DOCS = 200_000  # rows of a hub dataset read to train a tokenizer


def _sample_lines(
    sources: list[Source],
    max_sentences: int,
    seed: int,
    text_field: str = DEFAULT_TEXT_FIELD,
    max_docs: int | None = None,
):
    """Read every line once (checking the files), keep a seeded uniform sample of
    at most max_sentences; return (sample, corpus description)."""
    rng = random.Random(seed)
    sample: list[str] = []
    seen, has_text, total = 0, False, 0
    opts = ReadOptions(text_field=text_field)
    sizes = [source.size for source in sources]
    size = None if None in sizes else sum(sizes)
    with tqdm(total=size, unit="B", unit_scale=True, desc="read corpus") as bar:
        for source in sources:
            for line, nbytes in source.lines(opts, max_docs):
                bar.update(nbytes)
                total += nbytes
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
    files = [source.describe() for source in sources]
    names = ", ".join(map(str, sources[:3])) + (" ..." if len(sources) > 3 else "")
    if not seen:
        raise TokenizerError(f"the corpus is empty: no text lines in {names}")
    if not has_text:
        raise TokenizerError(f"the corpus holds only whitespace: {names}")
    if size is not None:
        total = size
    corpus = {"files": files, "bytes": total, "lines": seen, "sampled": len(sample)}
    if line := skipped_summary(opts.skipped, text_field):  # never dropped unsaid
        print(f"warning: {line}", file=sys.stderr)
        corpus["skipped_rows"] = dict(opts.skipped)
    return sample, corpus


def _check_output(out: Path) -> None:
    """Refuse an output folder that cannot be made, before the corpus is read."""
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"{out}: exists and is not a folder")
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent  # the folder that the missing ones would go in
    if not base.is_dir():
        raise TokenizerError(f"{out}: cannot be made: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise TokenizerError(f"{out}: cannot be made: {base} is not writable")


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
    inputs: Sequence[str | Path | Source],
    output: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    max_sentences: int = DEFAULT_MAX_SENTENCES,
    seed: int = 0,
    character_coverage: float = DEFAULT_COVERAGE,
    text_field: str = DEFAULT_TEXT_FIELD,
    max_docs: int | None = None,
) -> Tokenizer:
    """Train on `inputs` (paths, folders, globs or sources, see
    `src.corpus.sources.open_sources`): the lines of text files (`<|endoftext|>`
    lines are skipped) and of each row's `text_field` in jsonl/parquet files and
    hub datasets (of the first `max_docs` rows; None: all). Writes
    output/tokenizer.model and output/tokenizer_info.json."""
    if vocab_size > MAX_VOCAB:
        raise TokenizerError(
            f"--vocab-size {vocab_size} is too large: the maximum is {MAX_VOCAB}"
        )
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
    if not MIN_COVERAGE <= character_coverage <= 1.0:
        raise TokenizerError(
            f"--character-coverage {character_coverage} must be in "
            f"[{MIN_COVERAGE}, 1] (sentencepiece's rule)"
        )
    if max_sentences < 1 or seed < 0:
        raise TokenizerError(f"need max_sentences >= 1 ({max_sentences}), seed >= 0")
    out = Path(output)
    _check_output(out)
    sources = open_sources(inputs)
    sample, corpus = _sample_lines(sources, max_sentences, seed, text_field, max_docs)
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
    with atomic_file(out / INFO_FILE, "w") as f:
        json.dump(meta, f, indent=2)
    if legacy_info(out / LEGACY_INFO_FILE):  # ours, from before it was renamed
        (out / LEGACY_INFO_FILE).unlink()
    return Tokenizer.load(out)
