"""Generate text from a checkpoint: one prompt, a file of prompts, or a chat REPL.

    python -m src.inference --checkpoint checkpoints/<run>/best --prompt "Once"
    python -m src.inference --checkpoint DIR --prompts-file P.txt --output out.jsonl
    python -m src.inference --checkpoint DIR --interactive [--prompt "Hi"]

--checkpoint takes a checkpoint folder, a run folder (its best, else latest,
checkpoint), or a Hugging Face Llama/Qwen3 folder (config.json, *.safetensors and
its tokenizer: our tokenizer.model, else tokenizer.json), read in memory.
Without --seed, sampling takes a random seed and prints it on stderr.
`--ffn-fraction F` runs a MatFormer model (`model.matformer_widths`) at one of
its trained FFN widths, as the plain smaller model of its first F * ffn_dim
neurons per layer (`src.model.matformer.narrowed`), in every mode.
The checkpoint folder is self-contained: its meta.json holds the model config and
its tokenizer/ folder the tokenizer. Layer 3 of three: this CLI and the REPL
(`chat`) sit on `streaming` (text), which sits on `generate` (tokens).

Nothing made is lost: a prompts file's results are written (and flushed) one by
one as they are made, to stdout or a new --output file (an existing one is never
written over), and Ctrl-C or SIGTERM keep them. Text that is not valid UTF-8 (a
--prompt, a prompts file, a REPL line) is refused, naming it.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
import mlx.nn as nn

from .. import cli
from ..backend.policy import DTYPES
from ..checkpoint.contents import load_model
from ..errors import UsageError
from ..model.matformer import check_fraction, narrowed
from .batch import check_new_file, complete_file, read_prompts
from .generate import Stats
from .sampling import Sampling, add_sampling_args, sampling_from_args
from .streaming import check_utf8, prompt_ids, run_rows


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
    """Print the prompt, then stream its completion to stdout; Ctrl-C ends the
    line of what was printed, then goes on up (`cli.run`: `interrupted`, 130)."""
    ids = prompt_ids(tokenizer, prompt, model.config.context_length, s)
    print(prompt, end="", flush=True)
    try:
        run_rows(
            model, tokenizer, [ids], s, stats, lambda _, t: print(t, end="", flush=True)
        )
    except KeyboardInterrupt:
        print(flush=True)
        raise
    print()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=cli.program("src.inference"),
        description="Generate text from a checkpoint: --prompt, --prompts-file or "
        "--interactive (a chat REPL; /help inside). Output text streams as it is "
        "generated; --stats prints token counts, tokens/s and peak memory.",
        epilog="example: python -m src.inference --checkpoint checkpoints/tiny/best "
        '--prompt "Once upon a time" --temperature 0.8 --top-p 0.9',
    )
    add = p.add_argument
    add("--checkpoint", required=True, metavar="DIR", help="e.g. checkpoints/R/best, "
        "or a Hugging Face model folder (config.json + *.safetensors)")  # fmt: skip
    add("--tokenizer", metavar="DIR", help="default: the checkpoint's own "
        "tokenizer/ (a Hugging Face folder's: its own)")  # fmt: skip
    mode = p.add_argument_group("mode (default: one empty prompt)").add_argument
    mode("--prompt", action="append", default=[], help="prompt text (repeatable)")
    mode("--prompts-file", metavar="F", help="a file with one prompt per line")
    mode("--output", metavar="OUT", help="a new file (never written over) for "
         "--prompts-file results, each written as it is made: .txt (prompt + "
         "completion, then ---) or .jsonl (with token counts and timings); "
         "default stdout. Ctrl-C keeps the results made so far")  # fmt: skip
    mode("--batch-size", type=cli.positive_int, default=8, metavar="N",
         help="consecutive prompts generated together (default 8)")  # fmt: skip
    mode("--interactive", action="store_true", help="chat REPL (streaming); "
         "a --prompt is its first message")  # fmt: skip
    mode("--template", choices=("auto", "chat", "plain"), default="auto",
         help="REPL turn format: chat markers, plain continuation, or auto = chat "
         "if meta.json has chat_template: true (default auto)")  # fmt: skip
    hist = p.add_argument_group("REPL history (when the input is a terminal)")
    hist = hist.add_mutually_exclusive_group().add_argument
    hist("--history", metavar="FILE", help="keep typed input in FILE, appended to, "
         "recalled with the up arrow next time (default ~/.slm_chat_history)")  # fmt: skip
    hist("--no-history", action="store_true", help="read and write no history file")
    perf = p.add_argument_group("speed and memory").add_argument
    perf("--quantize", type=int, choices=(4, 8), help="quantize weights to 4 or 8 bits")
    perf("--dtype", choices=tuple(DTYPES), help="compute dtype (default: as saved)")
    perf("--stats", action="store_true", help="print tokens, tokens/s, peak memory")
    perf("--ffn-fraction", type=cli.number_in(0.0, 1.0, lo_open=True), metavar="F",
         help="a MatFormer model (model.matformer_widths) at one of its trained "
         "FFN widths: the smaller, faster model of the first F of each layer's "
         "FFN neurons (default: the whole model)")  # fmt: skip
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
    if (args.history or args.no_history) and not args.interactive:
        flag = "--history" if args.history else "--no-history"
        raise UsageError(f"{flag} needs --interactive")
    for i, text in enumerate(args.prompt, 1):
        check_utf8(text, f"--prompt #{i}" if len(args.prompt) > 1 else "--prompt")
    for text in s.stop:
        check_utf8(text, f"--stop {text!r}")
    if args.output:
        check_new_file(args.output)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None
    model, tokenizer, meta = load_model(args.checkpoint, args.tokenizer)
    if args.ffn_fraction is not None:
        f = check_fraction(model.config, args.ffn_fraction, args.checkpoint)
        model = narrowed(model, f)
        m = model.config
        print(f"FFN width {args.ffn_fraction:g}: {m.ffn_dim:,} neurons per layer, "
              f"{model.num_params():,} parameters", file=sys.stderr)  # fmt: skip
    prepare(model, args.dtype, args.quantize)
    mx.reset_peak_memory()
    if args.seed is None and s.temperature > 0:  # a random one: say it
        print(f"seed {s.seed} (pass --seed {s.seed} to reproduce)", file=sys.stderr)
    if args.interactive:
        from .chat import repl
        from .lineinput import HISTORY

        history = None if args.no_history else args.history or HISTORY
        return repl(model, tokenizer, meta, s, args.template, first=args.prompt,
                    history=history)  # fmt: skip
    if prompts is not None:
        return complete_file(
            model, tokenizer, prompts, s, args.batch_size, args.output, args.stats
        )
    for prompt in args.prompt or [""]:
        stats = Stats()
        one_shot(model, tokenizer, prompt, s, stats)
        print("---")
        if args.stats:
            print(f"[stats] {stats.summary()}", file=sys.stderr)
    return 0
