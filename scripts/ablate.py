"""Ablations: train one config several times, one change per row, same budget, and
print a markdown table (validation bits per byte, tokens/s, peak memory).

    python scripts/ablate.py --config configs/speedrun.yaml --steps 500 \\
        --set data.train_path=/tmp/d/train.bin ... [--only rmsnorm,nope] [--out t.md]

Every row is `python -m src.train` in its own process (`--set` overrides first,
then the row's changes), so rows never share state; the budget is a step count
(`--steps`, the same for every row: a loaded machine changes tokens/s, not the
loss) or a time (`--minutes`: `training.time_budget_minutes`, the trainer fits
the steps; fair only when nothing else runs). The numbers are the run's own log
(logs/<run>/metrics.jsonl): the last validation row's bits per byte, the median
tokens/s of the step rows after the first (compilation), and the peak memory.
`ROWS` lists the architecture ablations of issue 17; `--row "name: k=v k=v"`
adds others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> the model changes of that row (the first row is the baseline)
ROWS = {
    "base (rmsnorm, pre, rope, swiglu)": [],
    "norm none": ["model.norm=none"],
    "norm layernorm": ["model.norm=layernorm"],
    "post-norm": ["model.norm_position=post"],
    "no position (NoPE)": ["model.position=none"],
    "mlp geglu": ["model.mlp=geglu"],
    "mlp silu (plain, 4x)": ["model.mlp=silu"],
    "mlp gelu (plain, 4x)": ["model.mlp=gelu"],
    "mlp relu2 (plain, 4x)": ["model.mlp=relu2"],
}


def parse_row(text: str) -> tuple[str, list[str]]:
    name, _, changes = text.partition(":")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'name: key=value ...'")
    return name.strip(), changes.split()


def read_log(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "val_bpb" in r]
    steps = [r for r in rows if "tokens_per_s" in r]
    tps = [r["tokens_per_s"] for r in steps[1:]] or [r["tokens_per_s"] for r in steps]
    last = evals[-1] if evals else {}
    extra = [f"bpb{k[len('val_bpb'):]} {v:.4f}" for k, v in last.items()
             if k.startswith("val_bpb@")]  # fmt: skip
    if "val_moe_aux" in last:
        extra.append(f"moe aux {last['val_moe_aux']:.3f}")
    return {
        "extra": ", ".join(extra) or "-",
        "bpb": evals[-1]["val_bpb"] if evals else float("nan"),
        "step": evals[-1]["step"] if evals else 0,
        "tps": statistics.median(tps) if tps else float("nan"),
        "peak": max((r.get("peak_memory", 0) for r in steps), default=0) / 2**20,
        "losses": [r["loss"] for r in rows if "loss" in r and "val_bpb" not in r],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="optimizer steps per row")
    budget.add_argument("--minutes", type=float, help="training minutes per row")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every row")  # fmt: skip
    p.add_argument("--row", action="append", default=[], type=parse_row,
                   help="an extra row, 'name: key=value ...'")  # fmt: skip
    p.add_argument("--only", help="comma-separated row names (prefixes) to run")
    p.add_argument("--no-default-rows", action="store_true")
    p.add_argument("--dir", default="out/ablate", help="checkpoints and logs")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)

    rows = {} if args.no_default_rows else dict(ROWS)
    rows.update(dict(args.row))
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        rows = {k: v for k, v in rows.items() if any(k.startswith(w) for w in wanted)}
    if not rows:
        p.error("no rows to run")
    out = Path(args.dir)
    budget = (
        # a config's own time budget would replace the step count: off
        [f"training.max_steps={args.steps}", "training.time_budget_minutes=0"]
        if args.steps
        else [f"training.time_budget_minutes={args.minutes}"]
    )
    lines = [
        f"Config `{args.config}`, overrides `{' '.join(args.set) or '-'}`, budget "
        f"{f'{args.steps} steps' if args.steps else f'{args.minutes} min'} per row.",
        "",
        "| row | changes | val bpb | at step | tokens/s | peak MiB | wall s | also |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for i, (name, changes) in enumerate(rows.items()):
        run = f"ablate-{i:02d}"
        sets = [*args.set, *budget, *changes, f"run_name={run}",
                f"checkpoint.dir={out / 'ck'}", f"logging.dir={out / 'logs'}",
                "logging.progress_bar=false"]  # fmt: skip
        cmd = [sys.executable, "-m", "src.train", "--config", args.config]
        cmd += [a for s in sets for a in ("--set", s)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        log = out / "logs" / run / "metrics.jsonl"
        if proc.returncode != 0 or not log.exists():
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            line = f"| {name} | {' '.join(changes) or '-'} | failed: {tail[0]} ||||||"
        else:
            r = read_log(log)
            line = (
                f"| {name} | {' '.join(changes) or '-'} | {r['bpb']:.4f} | {r['step']} "
                f"| {r['tps']:,.0f} | {r['peak']:,.0f} | {wall:.0f} | {r['extra']} |"
            )
        lines.append(line)
        print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
