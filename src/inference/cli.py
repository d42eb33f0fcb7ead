"""Generate text from a checkpoint: one prompt, a file of prompts, or a chat REPL.

    python -m src.inference --checkpoint checkpoints/<run>/best --prompt "Once"
    python -m src.inference --checkpoint DIR --prompts-file P.txt --output out.jsonl
    python -m src.inference --checkpoint DIR --interactive

The checkpoint folder is self-contained: its meta.json holds the model config and
its tokenizer/ folder the tokenizer. Layer 3 of three: this CLI and the REPL
(`chat`) sit on `streaming` (text), which sits on `generate` (tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .. import cli
from ..backend.policy import DTYPES
from ..checkpoint.contents import load_model
from ..errors import UsageError, UserError
from .generate import Stats
from .sampling import Sampling, add_sampling_args, sampling_from_args
from .streaming import complete_batch, prompt_ids, run_rows


def prepare(model: nn.Module, dtype: str | None, bits: int | None) -> nn.Module:
    """Cast to `dtype`, then quantize linear layers and the embedding to `bits`
    (group size 64, or 32 for layers whose input width 64 does not divide)."""
    if dtype:
        model.set_dtype(DTYPES[dtype])
    if bits:

        def params(_, m: nn.Module) -> dict | bool:
            if not hasattr(m, "to_quantized"):
                return False
            width = m.weight.shape[-1]
            group = next((g for g in (64, 32) if width % g == 0), None)
            return {"group_size": group, "bits": bits} if group else False

        nn.quantize(model, class_predicate=params)
    mx.eval(model.parameters())
    return model


def one_shot(model, tokenizer, prompt: str, s: Sampling, stats: Stats) -> None:
    """Print the prompt, then stream its completion to stdout."""
    ids = prompt_ids(tokenizer, prompt, model.config.context_length, s)
    print(prompt, end="", flush=True)
    run_rows(
        model, tokenizer, [ids], s, stats, lambda _, t: print(t, end="", flush=True)
    )
    print()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m src.inference",
        description="Generate text from a checkpoint: --prompt, --prompts-file or "
        "--interactive (a chat REPL; /help inside). Output text streams as it is "
        "generated; --stats prints token counts, tokens/s and peak memory.",
        epilog="example: python -m src.inference --checkpoint checkpoints/tiny/best "
        '--prompt "Once upon a time" --temperature 0.8 --top-p 0.9',
    )
    add = p.add_argument
    add("--checkpoint", required=True, metavar="DIR", help="e.g. checkpoints/R/best")
    add("--tokenizer", metavar="DIR", help="default: the checkpoint's own tokenizer/")
    mode = p.add_argument_group("mode (default: one empty prompt)").add_argument
    mode("--prompt", action="append", default=[], help="prompt text (repeatable)")
    mode("--prompts-file", metavar="F", help="a file with one prompt per line")
    mode("--output", metavar="OUT", help="where --prompts-file results go: .txt "
         "(prompt + completion, then ---) or .jsonl (with token counts and "
         "timings); default stdout")  # fmt: skip
    mode("--batch-size", type=cli.positive_int, default=8, metavar="N",
         help="prompts of equal token length generated together (default 8)")  # fmt: skip
    mode("--interactive", action="store_true", help="chat REPL (streaming)")
    mode("--template", choices=("auto", "chat", "plain"), default="auto",
         help="REPL turn format: chat markers, plain continuation, or auto = chat "
         "if meta.json has chat_template: true (default auto)")  # fmt: skip
    perf = p.add_argument_group("speed and memory").add_argument
    perf("--quantize", type=int, choices=(4, 8), help="quantize weights to 4 or 8 bits")
    perf("--dtype", choices=tuple(DTYPES), help="compute dtype (default: as saved)")
    perf("--stats", action="store_true", help="print tokens, tokens/s, peak memory")
    add_sampling_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.command(build_parser(), argv, generate)


def generate(args: argparse.Namespace) -> int:
    try:
        s = sampling_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.output and not args.prompts_file:
        raise UsageError("--output needs --prompts-file")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise UserError(f"{args.output}: its folder does not exist")
    prompts = None
    if args.prompts_file:
        prompts = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
    model, tokenizer, meta = load_model(args.checkpoint, args.tokenizer)
    prepare(model, args.dtype, args.quantize)
    mx.reset_peak_memory()
    if args.interactive:
        from .chat import repl

        return repl(model, tokenizer, meta, s, args.template)
    if prompts is not None:
        t0, stats = time.perf_counter(), Stats()
        results = complete_batch(model, tokenizer, prompts, s, args.batch_size, stats)
        write_results(results, args.output)
        if args.stats:  # tokens computed: a batch row decodes on after its EOS
            took = f"{len(results)} prompts in {time.perf_counter() - t0:.2f} s"
            print(f"[stats] {took}; {stats.summary()}", file=sys.stderr)
        return 0
    for prompt in args.prompt or [""]:
        stats = Stats()
        one_shot(model, tokenizer, prompt, s, stats)
        print("---")
        if args.stats:
            print(f"[stats] {stats.summary()}", file=sys.stderr)
    return 0


def write_results(results: list[dict], output: str | None) -> None:
    """Completions to `output` (.jsonl: one object per prompt; else text blocks)."""
    if output and output.endswith(".jsonl"):
        lines = [json.dumps(r, ensure_ascii=False) for r in results]
    else:
        lines = [f"{r['prompt']}{r['completion']}\n---" for r in results]
    text = "\n".join(lines) + "\n"
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
