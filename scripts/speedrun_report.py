"""Score the speedrun's models and write the comparison table (scripts/speedrun.sh).

    python scripts/speedrun_report.py estimate --config C [--baseline]
    python scripts/speedrun_report.py score --checkpoint CK --label L --out J [--train-seconds S]
    python scripts/speedrun_report.py score --baseline DIR --tokenizer T --label L --out J
    python scripts/speedrun_report.py table J1 J2 ... --out-dir logs/speedrun

Every model is scored on the same windows of the same texts with the recipe's
tokenizer, by src.eval.evaluator's `Evaluator` (non-overlapping full-context
windows, bits per byte over the decoded target bytes): TinyStories validation (in
domain), WikiText-2 test and Gutenberg novels (out of domain; capped at MAX_TOKENS
tokens each, whole documents). `estimate` prints the seconds that scoring a model
of the config will take on this machine (an untrained model of the same shape
times a few batches, scaled to the sets' size, plus the samples and a margin): the
speedrun keeps that much of each arm's minutes for its evaluation. `score` writes
one model's results (JSON); `table` writes OUT_DIR/speedrun.md and speedrun.json,
one column per model, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--baseline" in sys.argv:  # torch scores: the global OpenBLAS that `import src`
    os.environ.setdefault("SLM_BLAS", "off")  # loads for MLX slows torch down
import src  # noqa: F401,E402  (loads the optimized BLAS; must precede mlx)

# isort: split
import mlx.core as mx  # noqa: E402

from src.backend import policy  # noqa: E402
from src.checkpoint.contents import load_model  # noqa: E402
from src.config import load_config  # noqa: E402
from src.data.loader import TokenLoader  # noqa: E402
from src.data.tokens import write_tokens  # noqa: E402
from src.eval.cli import encode_text  # noqa: E402
from src.eval.evaluator import Evaluator, make_eval_fn  # noqa: E402
from src.inference.generate import generate_tokens  # noqa: E402
from src.model.transformer import Model  # noqa: E402
from src.tokenizer.kinds import load_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
# tokens per set (whole documents); SPEEDRUN_EVAL_TOKENS lowers it (the tests)
MAX_TOKENS = int(os.environ.get("SPEEDRUN_EVAL_TOKENS", 250_000))
BATCH = 16  # windows per evaluation batch
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
SAMPLE_TOKENS = 60
ESTIMATE_BATCHES = 3  # timed, after one untimed (compilation, caches)
ESTIMATE_MARGIN = 1.25  # x the measured time (encoding, scoring, sampling)
ESTIMATE_START_S = 5  # + a process's start: imports, loading the checkpoint


def evaluators(tok, context: int, vocab: int) -> list[tuple[str, Path, Evaluator]]:
    """(name, path, Evaluator) for each set found (missing ones are said, skipped)."""
    out = []
    for name, path, delimiter in EVAL_SETS:
        if not path.exists():
            print(f"skipping {name}: {path} not found", file=sys.stderr)
            continue
        tokens, _ = encode_text(str(path), tok, delimiter, MAX_TOKENS)
        with tempfile.TemporaryDirectory() as tmp:
            write_tokens(Path(tmp) / "t.bin", tokens, tok.vocab_size)
            loader = TokenLoader(Path(tmp) / "t.bin", context, vocab)
            out.append((name, path, Evaluator(loader, BATCH, MAX_TOKENS, tok.decode)))
    return out


def baseline_fn(model):
    sys.path.insert(0, str(ROOT / "scripts"))
    import baseline_gpt2

    return lambda b: mx.array(baseline_gpt2.loss_sum(model, b))


def estimate(config: str, baseline: bool) -> float:
    """Seconds that `score` of a model shaped as `config` (or the baseline built
    from it) will take here."""
    cfg = load_config(config)
    m = cfg.model
    tok = load_tokenizer(cfg.data.tokenizer_path)
    t0 = time.perf_counter()
    sets = evaluators(tok, m.context_length, m.vocab_size)
    encoding = time.perf_counter() - t0
    batches = sum(len(ev.batches) for _, _, ev in sets)
    if baseline:
        sys.path.insert(0, str(ROOT / "scripts"))
        import baseline_gpt2

        fn = baseline_fn(baseline_gpt2.GPT(**baseline_gpt2.shape_of(cfg)))
        per_token_s = 0.0  # the baseline draws no samples
    else:
        model = Model(m)
        model.eval()
        fn = make_eval_fn(model, streams=policy.streams())  # as python -m src.eval
        t0 = time.perf_counter()
        list(generate_tokens(model, tok.encode(PROMPTS[0]), 8, 0.8, seed=0))
        per_token_s = (time.perf_counter() - t0) / 8
    ev = sets[0][2] if sets else None
    if ev is None or not ev.batches:
        return ESTIMATE_MARGIN * encoding + ESTIMATE_START_S
    probe = [mx.array(b, dtype=mx.int32) for b in ev.batches[: ESTIMATE_BATCHES + 1]]
    mx.eval(fn(probe[0]))
    t0 = time.perf_counter()
    for b in probe[1:]:
        mx.eval(fn(b))
    per_batch = (time.perf_counter() - t0) / max(len(probe) - 1, 1)
    sampling = per_token_s * SAMPLE_TOKENS * len(PROMPTS)
    work = encoding + batches * per_batch + sampling
    return ESTIMATE_MARGIN * work + ESTIMATE_START_S


def score(args) -> dict:
    t0 = time.perf_counter()
    if args.baseline:
        sys.path.insert(0, str(ROOT / "scripts"))
        import baseline_gpt2

        model = baseline_gpt2.load(args.baseline)
        tok = load_tokenizer(args.tokenizer)
        trained = json.loads((Path(args.baseline) / "results.json").read_text())
        ctx, vocab = model.wpe.num_embeddings, model.wte.num_embeddings
        fn = baseline_fn(model)
        result = {"parameters": trained["parameters"], "steps": trained["steps"],
                  "tokens": trained["tokens"], "samples": []}  # fmt: skip
    else:
        model, tok, meta = load_model(args.checkpoint)
        ctx, vocab = model.config.context_length, model.config.vocab_size
        t = meta.get("config", {}).get("training", {})
        per_step = t.get("batch_size", 0) * t.get("grad_accum_steps", 1) * ctx
        fn = make_eval_fn(model, streams=policy.streams())  # as python -m src.eval
        samples = [
            (p, tok.decode(list(generate_tokens(
                model, tok.encode(p), SAMPLE_TOKENS, 0.8, seed=0, eos_id=tok.eos_id))))
            for p in PROMPTS
        ]  # fmt: skip
        result = {"checkpoint": args.checkpoint, "parameters": model.num_params(),
                  "steps": meta.get("step"), "tokens": meta.get("step", 0) * per_step,
                  "samples": samples}  # fmt: skip
    rows = []
    for name, path, ev in evaluators(tok, ctx, vocab):
        rows.append({"set": name, "path": str(path), "tokens": ev.tokens,
                     "bytes": ev.bytes, "bpb": ev(fn).bits_per_byte})  # fmt: skip
    result.update(label=args.label, eval=rows, eval_seconds=time.perf_counter() - t0)
    if args.train_seconds is not None:
        result["train_seconds"] = args.train_seconds
    if args.baseline and "train_seconds" not in result:
        result["train_seconds"] = trained["train_seconds"]
    return result


def markdown(results: list[dict]) -> str:
    """One column per model: bits per byte on each set (the best in bold), then
    what each trained."""
    labels = [r["label"] for r in results]
    lines = ["| bits per byte | " + " | ".join(labels) + " |",
             "|---" * (len(labels) + 1) + "|"]  # fmt: skip
    names = [row["set"] for row in results[0]["eval"]]
    for name in names:
        vals = [next((x["bpb"] for x in r["eval"] if x["set"] == name), None)
                for r in results]  # fmt: skip
        best = min(v for v in vals if v is not None)
        cells = ["-" if v is None else (f"**{v:.4f}**" if v == best else f"{v:.4f}")
                 for v in vals]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, fmt in (("parameters", "{:,}"), ("steps", "{:,}"),
                     ("train_seconds", "{:.0f}"), ("eval_seconds", "{:.0f}")):  # fmt: skip
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for r in results]
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(cells) + " |")
    for r in results:
        if r["samples"]:
            lines += ["", f"## Samples: {r['label']} (temperature 0.8, seed 0)", ""]
            lines += [f"- **{p}**{text}" for p, text in r["samples"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("estimate", help="seconds that scoring a model will take")
    e.add_argument("--config", required=True, help="the recipe's config")
    e.add_argument("--baseline", action="store_true", help="the baseline's shape")
    s = sub.add_parser("score", help="score one model, write its JSON")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="one of our checkpoints")
    which.add_argument("--baseline", help="the baseline's output folder")
    s.add_argument("--tokenizer", help="the baseline's tokenizer (the recipe's)")
    s.add_argument("--label", required=True, help="the model's column name")
    s.add_argument("--out", required=True, type=Path, help="JSON to write")
    s.add_argument("--train-seconds", type=float, help="its training wall time")
    t = sub.add_parser("table", help="the comparison of scored models")
    t.add_argument("results", nargs="+", type=Path, help="JSON files from `score`")
    t.add_argument("--out-dir", required=True, type=Path)
    args = p.parse_args()
    policy.configure_process()
    if args.command == "estimate":
        print(f"{estimate(args.config, args.baseline):.0f}")
    elif args.command == "score":
        if args.baseline and not args.tokenizer:
            p.error("score --baseline needs --tokenizer")
        result = score(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"{args.label}: " + ", ".join(
            f"{r['set']} {r['bpb']:.4f}" for r in result["eval"]))  # fmt: skip
    else:
        results = [json.loads(f.read_text()) for f in args.results]
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "speedrun.json").write_text(json.dumps(results, indent=2))
        text = markdown(results)
        (args.out_dir / "speedrun.md").write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
