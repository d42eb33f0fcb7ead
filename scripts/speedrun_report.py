"""Score the speedrun's model (and the baseline, if trained) and write the report.

    python scripts/speedrun_report.py logs/speedrun [--checkpoint checkpoints/speedrun/latest]

Both models are scored on the same windows of the same texts with our tokenizer,
by src.eval.evaluator's `Evaluator` (non-overlapping full-context windows, bits per byte over
the decoded target bytes): TinyStories validation (in domain), WikiText-2 test and
Gutenberg novels (out of domain; capped at MAX_TOKENS tokens each, whole
documents). Writes RUN_LOG/speedrun.md and speedrun.json; prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import src  # noqa: F401,E402  (loads the optimized BLAS; must precede mlx)

# isort: split
import mlx.core as mx  # noqa: E402

from src.backend import policy  # noqa: E402
from src.checkpoint.contents import load_model  # noqa: E402
from src.data.tokens import TokenLoader, write_tokens  # noqa: E402
from src.eval.cli import encode_text  # noqa: E402
from src.eval.evaluator import Evaluator, make_eval_fn  # noqa: E402
from src.inference.generate import generate_tokens  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MAX_TOKENS = 250_000
# (name, path, document delimiter: see `python -m src.eval --help`)
EVAL_SETS = [
    ("TinyStories valid", SHARED / "tinystories_valid.txt", "<|endoftext|>"),
    ("WikiText-2 test", SHARED / "wikitext-2" / "test.txt", "none"),
    ("Gutenberg", SHARED / "gutenberg", "none"),
]
PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Lily wanted to",
    "One day, a boy named Tom",
    "The sun was",
]


def score(run_log: Path, checkpoint: str) -> dict:
    model, tok, meta = load_model(checkpoint)
    L = model.config.context_length
    baseline = None
    if (run_log / "baseline" / "model.pt").exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        import baseline_gpt2

        baseline = baseline_gpt2.load(run_log / "baseline")
    ours_fn = make_eval_fn(model)
    rows = []
    for name, path, delimiter in EVAL_SETS:
        if not path.exists():
            print(f"skipping {name}: {path} not found", file=sys.stderr)
            continue
        tokens, _ = encode_text(str(path), tok, delimiter, MAX_TOKENS)
        with tempfile.TemporaryDirectory() as tmp:
            write_tokens(Path(tmp) / "t.bin", tokens, tok.vocab_size)
            loader = TokenLoader(Path(tmp) / "t.bin", L, model.config.vocab_size)
            ev = Evaluator(loader, 16, MAX_TOKENS, tok.decode)
        row = {"set": name, "path": str(path), "tokens": ev.tokens, "bytes": ev.bytes}
        row["ours_bpb"] = ev(ours_fn).bits_per_byte
        if baseline is not None:
            fn = lambda b: mx.array(baseline_gpt2.loss_sum(baseline, b))  # noqa: E731
            row["baseline_bpb"] = ev(fn).bits_per_byte
        rows.append(row)
    samples = [
        (p, tok.decode(list(generate_tokens(
            model, tok.encode(p), 60, 0.8, seed=0, eos_id=tok.eos_id))))
        for p in PROMPTS
    ]  # fmt: skip
    result = {"checkpoint": checkpoint, "step": meta.get("step"),
              "parameters": model.num_params(), "eval": rows, "samples": samples}  # fmt: skip
    if baseline is not None:
        result["baseline"] = json.loads(
            (run_log / "baseline" / "results.json").read_text()
        )
        result["baseline"].pop("log", None)
    return result


def markdown(r: dict) -> str:
    has_base = "baseline" in r
    lines = [f"# Speedrun: {r['checkpoint']} (step {r['step']}, "
             f"{r['parameters']:,} parameters)", ""]  # fmt: skip
    if has_base:
        b = r["baseline"]
        lines += [f"Baseline: nanoGPT-style GPT-2 in PyTorch, {b['parameters']:,} "
                  f"parameters, {b['steps']} steps, {b['tokens']:,} tokens in "
                  f"{b['train_seconds']:.0f} s.", ""]  # fmt: skip
    head = "| text | tokens | bytes | ours (bits/byte) |" + (
        " baseline (bits/byte) |" if has_base else ""
    )
    lines += [head, "|---" * (5 if has_base else 4) + "|"]
    for row in r["eval"]:
        cells = [row["set"], f"{row['tokens']:,}", f"{row['bytes']:,}",
                 f"{row['ours_bpb']:.4f}"]  # fmt: skip
        if has_base:
            cells.append(f"{row['baseline_bpb']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Samples (temperature 0.8, seed 0)", ""]
    for prompt, text in r["samples"]:
        lines.append(f"- **{prompt}**{text}")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_log", type=Path, help="the run's log folder (logs/speedrun)")
    p.add_argument("--checkpoint", help="default: checkpoints/<run>/latest")
    args = p.parse_args()
    policy.configure_process()
    checkpoint = args.checkpoint or f"checkpoints/{args.run_log.name}/latest"
    result = score(args.run_log, checkpoint)
    args.run_log.mkdir(parents=True, exist_ok=True)
    (args.run_log / "speedrun.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.run_log / "speedrun.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
