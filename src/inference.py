"""Generate text from a checkpoint: `python -m src.inference --checkpoint DIR --prompt TEXT`.

The checkpoint folder is self-contained: its meta.json holds the model config and
its tokenizer/ folder the tokenizer, so nothing else is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx

from . import checkpoint as ckpt
from .config import ConfigError, config_from_dict
from .generate import generate_tokens
from .model import Model
from .tokenizer import Tokenizer, TokenizerError


def load_model(path: str | Path, tokenizer_path: str | Path | None = None):
    """(model, tokenizer, meta) from a checkpoint folder (or its best/latest link)."""
    path = ckpt.resolve_resume(str(path), Path(path).parent)
    weights, _, meta = ckpt.load_checkpoint(path)
    cfg = config_from_dict(meta["config"])
    tokenizer = Tokenizer.load(tokenizer_path or path / "tokenizer")
    if tokenizer.sha256 != meta.get("tokenizer_sha256"):
        trained = Tokenizer.load(path / "tokenizer")
        if tokenizer.vocab_size != trained.vocab_size:
            raise ConfigError(
                f"tokenizer {tokenizer.dir} has {tokenizer.vocab_size} tokens but the "
                f"model in {path} was trained with a {trained.vocab_size}-token tokenizer"
            )
        print(
            f"warning: {tokenizer.dir} is not the tokenizer {path} was trained with "
            "(same vocabulary size)",
            file=sys.stderr,
        )
    model = Model(cfg.model)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m src.inference", description="Generate text from a checkpoint."
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder, e.g. checkpoints/<run>/best",
    )
    p.add_argument(
        "--prompt", action="append", default=[], help="prompt text (repeatable)"
    )
    p.add_argument(
        "--tokenizer", help="tokenizer folder (default: the checkpoint's own)"
    )
    p.add_argument("--max-tokens", type=int, default=100, help="new tokens per prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = p.parse_args(argv)
    if args.max_tokens < 0 or args.temperature < 0:
        p.error("--max-tokens and --temperature must be >= 0")
    try:
        model, tokenizer, _ = load_model(args.checkpoint, args.tokenizer)
    except (ckpt.CheckpointError, ConfigError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for prompt in args.prompt or [""]:
        ids = tokenizer.encode(prompt)
        out = generate_tokens(
            model, ids, args.max_tokens, args.temperature, args.seed, tokenizer.eos_id
        )
        print(f"{prompt}{tokenizer.decode(list(out))}\n---")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
