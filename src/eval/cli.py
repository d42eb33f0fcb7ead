"""The evaluation CLI: mean loss, perplexity and bits per byte of checkpoints on a
token file or on raw text, over the windows the trainer's validation uses
(`src.eval.evaluator`), so the numbers agree.

    python -m src.eval --checkpoint checkpoints/<run>/best --data valid.txt
    python -m src.eval --compare ck/a/best ck/b/best --data valid.txt --json
    python -m src.eval --checkpoint out/hf --data valid.txt   # a Hugging Face folder

Raw text (.txt, .jsonl, .parquet, a folder or a glob) is split into documents as
`python -m src.data prepare` does (`--delimiter`), but not filtered or
deduplicated: each document is encoded with the checkpoint's tokenizer as
`tokens EOS`, and the documents are concatenated in order.

A token file with an assistant mask (chat data, `prepare --chat`) is scored on
the assistant's tokens only, as the chat fine-tune's validation does.

`--ffn-fraction F` scores a MatFormer model (`model.matformer_widths`) at one of
its trained FFN widths: the plain model of its first F * ffn_dim neurons per
layer (`src.model.matformer.narrowed`), which is what the run's validation
logged as `val_loss@F` and what `src.convert --ffn-fraction F` exports.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np

from .. import cli
from ..backend import policy
from ..checkpoint.contents import load_model
from ..corpus.sources import ReadOptions, iter_corpus, open_sources
from ..corpus.text import DOC_DELIMITER
from ..data.loader import TokenLoader
from ..data.tokens import MAGIC, token_dtype, write_tokens
from ..errors import DataError, UsageError, utf8_problem
from ..model.matformer import check_fraction, narrowed
from .evaluator import Evaluator, make_eval_fn

# Documents are encoded in batches of ENCODE_BATCH documents or ENCODE_CHARS
# characters, whichever comes first; a max_tokens limit stops between batches.
ENCODE_BATCH, ENCODE_CHARS = 256, 1 << 20


def is_token_file(path: Path) -> bool:
    """A .bin file, or any file that starts with the token-file magic."""
    if path.suffix == ".bin":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def encode_text(
    spec: str, tokenizer, delimiter: str, max_tokens: int | None = None
) -> tuple[np.ndarray, int]:
    """(token ids, UTF-8 bytes of the documents read) of raw text: each non-empty
    document of the source, in order, as `tokens EOS`; with max_tokens, reading
    stops once there are max_tokens + 1 tokens (whole documents)."""
    dtype = token_dtype(tokenizer.vocab_size)
    sources = open_sources([spec])
    docs = (d for d, _ in iter_corpus(sources, ReadOptions(delimiter)))
    chunks, n_tokens, n_bytes, batch = [], 0, 0, []
    for doc in itertools.chain(docs, [None]):  # None: flush the last batch
        if doc:
            batch.append(doc)
        if batch and (
            doc is None
            or len(batch) == ENCODE_BATCH
            or sum(map(len, batch)) >= ENCODE_CHARS
        ):
            chunks += [
                np.asarray(i, dtype) for i in tokenizer.encode_batch(batch, eos=True)
            ]
            n_tokens += sum(len(c) for c in chunks[-len(batch) :])
            n_bytes += sum(len(d.encode("utf-8")) for d in batch)
            batch = []
            if max_tokens is not None and n_tokens > max_tokens:
                break
    if not chunks:
        raise DataError(f"{spec}: no text in it")
    return np.concatenate(chunks), n_bytes


def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    delimiter: str = DOC_DELIMITER,
    ffn_fraction: float | None = None,
) -> dict:
    """Load a checkpoint, evaluate it on a token file or raw text; a JSON-able dict.
    With `ffn_fraction`, at that MatFormer FFN width (ConfigError if the model
    was not trained at it).

    batch_size (default: the run's training.batch_size) does not change the
    result beyond float rounding. Raises DataError, CheckpointError, ConfigError,
    TokenizerError on user mistakes."""
    model, tokenizer, meta = load_model(checkpoint)
    if ffn_fraction is not None:
        check_fraction(model.config, ffn_fraction, str(checkpoint))
        model = narrowed(model, ffn_fraction)
    cfg = model.config
    L, vocab = cfg.context_length, cfg.vocab_size
    batch_size = batch_size or meta["config"]["training"]["batch_size"]
    path = Path(data)
    with tempfile.TemporaryDirectory(prefix="slm-eval-") as tmp:
        if is_token_file(path):
            kind, text_bytes = "tokens", None
            loader = TokenLoader(path, L, vocab, tokenizer.sha256)
        else:
            kind = "text"
            tokens, text_bytes = encode_text(data, tokenizer, delimiter, max_tokens)
            if len(tokens) < L + 1:
                raise DataError(
                    f"{data}: {len(tokens)} tokens of text, fewer than "
                    f"context_length + 1 = {L + 1} needed for one window"
                )
            write_tokens(Path(tmp) / "text.bin", tokens, tokenizer.vocab_size)
            loader = TokenLoader(Path(tmp) / "text.bin", L, vocab)
        masked = loader.has_mask  # chat data: the assistant's tokens, as training
        evaluator = Evaluator(loader, batch_size, max_tokens, tokenizer.decode, masked)
        result = evaluator(make_eval_fn(model, streams=policy.streams(), masked=masked))
    return {
        "checkpoint": str(checkpoint),
        "step": meta.get("step"),
        "parameters": model.num_params(),
        "ffn_fraction": ffn_fraction,
        "ffn_dim": cfg.ffn_dim,
        "data": str(data),
        "kind": kind,
        "loss": result.loss,
        "perplexity": result.perplexity,
        "bits_per_byte": result.bits_per_byte,
        "tokens": result.tokens,
        "bytes": result.bytes,
        "text_bytes": text_bytes,
        "loss_on": "assistant" if masked else "all",
        "windows": evaluator.windows,
        "context_length": L,
        "method": f"non-overlapping windows of {L} tokens, full context",
        **(
            {"moe_aux": result.moe_aux, "expert_share": result.expert_share}
            if result.moe_aux is not None
            else {}
        ),
    }


def format_one(r: dict) -> str:
    rows = [
        ("checkpoint", f"{r['checkpoint']} (step {r['step']}, "
                       f"{r['parameters']:,} parameters)"),
        *([("ffn width", f"{r['ffn_fraction']:g} ({r['ffn_dim']:,} neurons per "
                          "layer, MatFormer)")] if r["ffn_fraction"] else []),
        ("data", f"{r['data']} ({'token file' if r['kind'] == 'tokens' else 'text'})"),
        ("windows", f"{r['windows']:,} non-overlapping windows of "
                    f"{r['context_length']} tokens (full context)"),
        ("loss", f"{r['loss']:.4f} nats/token"),
        ("perplexity", f"{r['perplexity']:.3f}"),
        ("bits/byte", f"{r['bits_per_byte']:.4f}"),
        ("tokens", f"{r['tokens']:,}" + (" (the assistant's tokens only)"
                                           if r["loss_on"] == "assistant" else "")),
        ("bytes", f"{r['bytes']:,}"),
    ]  # fmt: skip
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def format_table(results: list[dict]) -> str:
    """A fixed-width table, one row per checkpoint."""
    head = ("checkpoint", "step", "params", "loss", "ppl", "bpb", "tokens", "bytes")
    rows = [
        (
            r["checkpoint"],
            str(r["step"]),
            f"{r['parameters']:,}",
            f"{r['loss']:.4f}",
            f"{r['perplexity']:.3f}",
            f"{r['bits_per_byte']:.4f}",
            f"{r['tokens']:,}",
            f"{r['bytes']:,}",
        )
        for r in results
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(row, widths)))
        for row in (head, *rows)
    ]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    r = results[0]
    lines.append(
        f"data: {r['data']}; non-overlapping full-context windows "
        "(each model's own context and tokenizer)"
        + (f"; MatFormer FFN width {f:g}" if (f := r["ffn_fraction"]) else "")
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=cli.program("src.eval"),
        description="Mean loss, perplexity and bits per byte of checkpoints on a "
        "token file (.bin, e.g. data/tinystories/val.bin) or raw text (.txt, "
        ".jsonl, .parquet, a folder or a glob; tokenized with each checkpoint's "
        "own tokenizer). Every target token is scored once, over non-overlapping "
        "windows of the model's full context length, as the trainer's validation.",
        epilog="examples: python -m src.eval --checkpoint checkpoints/tiny/best "
        "--data ../shared/data/tinystories_valid.txt; python -m src.eval --compare "
        "checkpoints/a/best checkpoints/b/best --data valid.txt --json",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a checkpoint or run folder, or a Hugging Face model folder "
        "(config.json + *.safetensors, with its tokenizer)",
    )
    which.add_argument(
        "--compare", nargs="+", metavar="DIR", help="several checkpoints: a table"
    )
    p.add_argument("--data", required=True, metavar="FILE", help="token file or text")
    p.add_argument(
        "--max-tokens",
        type=cli.positive_int,
        metavar="N",
        help="score the first N target tokens (rounded up to whole windows; "
        "default: all)",
    )
    p.add_argument(
        "--batch-size",
        type=cli.positive_int,
        metavar="B",
        help="windows per forward pass (default: the run's training batch size)",
    )
    p.add_argument(
        "--delimiter",
        default=DOC_DELIMITER,
        help="raw .txt only: a line holding only this ends a document; 'blank' "
        "(blank lines) or 'none' (one document per file); default <|endoftext|>",
    )
    p.add_argument(
        "--ffn-fraction",
        type=cli.number_in(0.0, 1.0, lo_open=True),
        metavar="F",
        help="a MatFormer model (model.matformer_widths) at one of its trained "
        "FFN widths: the smaller model of the first F of each layer's FFN neurons "
        "(default: the whole model)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.command(build_parser(), argv, evaluate)


def evaluate(args: argparse.Namespace) -> None:
    if why := utf8_problem(args.delimiter):
        raise UsageError(f"--delimiter is {why}")
    policy.configure_process()
    checkpoints = args.compare or [args.checkpoint]
    results = [
        evaluate_checkpoint(
            ck,
            args.data,
            args.max_tokens,
            args.batch_size,
            args.delimiter,
            args.ffn_fraction,
        )
        for ck in checkpoints
    ]
    if args.json:
        print(json.dumps(results if args.compare else results[0], indent=2))
    elif args.compare:
        print(format_table(results))
    else:
        print(format_one(results[0]))
