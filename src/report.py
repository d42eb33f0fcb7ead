"""A markdown report of one run: `python -m src.report logs/<run>`.

Writes logs/<run>/report.md (config summary, parameter count, tokens seen, wall
time, final and best validation loss and bits per byte, throughput, peak memory,
the last samples) and logs/<run>/training.png (src/plot.py), embedded in it.
Reads the run's logs only; no MLX here. Both files are written whole or not at
all; a write that fails names the file (a full disk said as such).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from . import cli
from .cli import fmt_bytes
from .errors import PlotError
from .files import atomic_file, write_failure
from .plot import DEFAULT_PNG, Run, load_run, plot_runs

N_SAMPLES = 3


def fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def summary(run: Run) -> dict:
    """The report's numbers (None where the log has no data)."""
    last = run.train[-1]
    rates = [r["tokens_per_s"] for r in run.rate_rows()]  # without compiling
    mems = [r["peak_memory"] for r in run.train if r.get("peak_memory")]
    times = [r["time"] for r in run.train + run.evals if "time" in r]
    t0 = run.start_time()
    tail = [r["loss"] for r in run.train[-10:] if not r.get("skipped")]
    return {
        "run": run.name,
        "parameters": run.config.model.num_params(),
        "steps": last["step"],
        "tokens": last["step"] * run.tokens_per_step,
        "seconds": max(times) - t0 if times and t0 is not None else None,
        "train_loss": sum(tail) / len(tail) if tail else None,
        "final": run.evals[-1] if run.evals else None,
        "best": run.best(),
        "resumed": run.resumes(),
        "tokens_per_s": statistics.median(rates) if rates else None,
        "peak_memory": max(mems) if mems else None,
        "skipped": sum(bool(r.get("skipped")) for r in run.train),
    }


def _val(row: dict | None) -> str:
    if row is None:
        return "no validation yet"
    return (
        f"loss {row['val_loss']:.4f}, {row['val_bpb']:.4f} bits/byte, "
        f"perplexity {row['val_ppl']:.2f} (step {row['step']})"
    )


def render(run: Run, png: str | None) -> str:
    """The markdown text of the report; `png`: the plot's path relative to it."""
    s, c = summary(run), run.config
    m, t = c.model, c.training
    rows = [
        ("parameters", f"{s['parameters']:,}"),
        ("steps", f"{s['steps']:,} of {t.max_steps:,}"),
        ("tokens seen", f"{s['tokens']:,} ({t.batch_size} x {t.grad_accum_steps} x "
                        f"{m.context_length} per step)"),
        ("wall time", fmt_seconds(s["seconds"]) if s["seconds"] is not None
         else "unknown (no timestamps in the log)"),
        ("final validation", _val(s["final"])),
        ("best validation", _val(s["best"])),
        ("train loss (last 10 steps)", "n/a" if s["train_loss"] is None
         else f"{s['train_loss']:.4f}"),
        ("throughput", "n/a" if s["tokens_per_s"] is None
         else f"{s['tokens_per_s']:,.0f} tokens/s (median of logging rows)"),
        ("peak memory", "n/a" if s["peak_memory"] is None
         else fmt_bytes(s["peak_memory"])),
        ("skipped steps", str(s["skipped"])),
        ("resumed at", ", ".join(f"step {k}" for k in s["resumed"]) or "never"),
    ]  # fmt: skip
    out = [f"# Run report: {run.name}", ""]
    out += [f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{run.dir}`.", ""]
    if png:
        out += [f"![training curves]({png})", ""]
    out += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    out += [
        "## Config",
        "",
        f"- model: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads "
        f"({m.kv_heads} kv), ffn {m.ffn_dim}, context {m.context_length}, vocab "
        f"{m.vocab_size}, tied embeddings {m.tie_embeddings}, qk-norm {m.qk_norm}, "
        f"dropout {m.dropout}",
        f"- training: batch {t.batch_size} x accum {t.grad_accum_steps}, lr "
        f"{t.learning_rate:g} (warm-up {t.warmup_steps}, {t.schedule}"
        + (f" over the last {t.decay_fraction:g}" if t.schedule == "wsd" else "")
        + f" to x{t.min_lr_ratio:g}), weight decay {t.weight_decay:g}, grad clip "
        f"{t.grad_clip:g}, precision {t.precision}, seed {t.seed}",
        f"- data: train `{c.data.train_path}`, val `{c.data.val_path}`, tokenizer "
        f"`{c.data.tokenizer_path}`; validation on {c.eval.max_tokens:,} tokens "
        f"every {c.eval.interval} steps",
        "",
    ]
    if run.evals:
        out += ["## Validation", "", "| step | tokens | loss | bits/byte | ppl |"]
        out += ["|---:|---:|---:|---:|---:|"]
        for r in run.evals[-12:]:
            out.append(
                f"| {r['step']} | {r['step'] * run.tokens_per_step:,} | "
                f"{r['val_loss']:.4f} | {r['val_bpb']:.4f} | {r['val_ppl']:.2f} |"
            )
        out.append("")
    if run.samples:
        out += ["## Samples", ""]
        for r in reversed(run.samples[-N_SAMPLES:]):  # newest first
            out += [f"Step {r['step']}:", "", "```", f"{r['prompt']}{r['text']}"]
            out += ["```", ""]
    return "\n".join(out)


def write_report(log_dir: str | Path, plot: bool = True) -> Path:
    """logs/<run>/report.md (and training.png unless plot=False); its path."""
    run = load_run(log_dir)
    png = None
    if plot:
        plot_runs([run], run.dir / DEFAULT_PNG)
        png = DEFAULT_PNG
    path = run.dir / "report.md"
    text = render(run, png)
    try:
        with atomic_file(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise PlotError(write_failure(path, e)) from None
    return path


def after_training(log_dir: Path, log) -> str | None:
    """For the trainer's end: write the plot and report.md, saying where via
    `log.info`. A write that fails (a full disk...) is an `log.error` and is
    returned, so the run exits non-zero (its checkpoint is saved already); a
    bug in plotting is only a warning. Nothing when the run's own log could not
    be written (`log.failure`): the trainer has said so, and the logs are
    incomplete."""
    if getattr(log, "failure", None):
        return None
    try:
        path = write_report(log_dir)
    except PlotError as e:  # says what failed in user terms (e.g. a full disk)
        failure = f"no report for {log_dir}: {e}"
        log.error(failure)
        return failure
    except Exception as e:  # a broken plot must never fail a finished run
        log.warn(f"no report for {log_dir}: {type(e).__name__}: {e}")
        return None
    log.info(f"report: {path} (plot: {path.parent / DEFAULT_PNG})")
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m src.report",
        description="Write logs/<run>/report.md: config summary, parameters, tokens "
        "seen, wall time, final and best validation loss and bits per byte, "
        "throughput, peak memory, samples, and the training plot (training.png).",
        epilog="example: python -m src.report logs/tiny",
    )
    p.add_argument("runs", nargs="+", metavar="LOG_DIR", help="e.g. logs/<run>")
    p.add_argument("--no-plot", action="store_true", help="skip training.png")
    return p


def main(argv: list[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> None:
        for d in args.runs:
            print(write_report(d, plot=not args.no_plot))

    return cli.command(build_parser(), argv, run, catch=(OSError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
