"""Training curves from run logs: `python -m src.plot logs/<run> [logs/<run2> ...]`.

One PNG with four panels: train and validation loss against tokens and against
wall time, the learning rate, and tokens/s; several runs share the figure (one
colour per run). Reads logs/<run>/metrics.jsonl and logs/<run>/config.yaml only;
no MLX here, and matplotlib draws on its Agg canvas (no display, no pyplot state).
The PNG is written whole or not at all; a failed write names it (`PlotError`).

Tokens at step s = s * batch_size * grad_accum_steps * context_length. Wall time
comes from the "time" field (time.time()) of logging and eval rows: seconds since
the run started, estimated as the first logging row's time minus its steps at its
tokens/s. A resumed run shows the pause as a gap. Logs without "time" fields
(older runs) get no time panel data.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import cli
from .config import Config, load_config
from .errors import ConfigError, PlotError
from .files import atomic_file, write_failure

DEFAULT_PNG = "training.png"
TIME_UNITS = (("h", 3600.0), ("min", 60.0), ("s", 1.0))  # the first >= 2 units


@dataclass
class Run:
    """The parsed logs of one run."""

    dir: Path
    config: Config
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def tokens_per_step(self) -> int:
        t = self.config.training
        return t.batch_size * t.grad_accum_steps * self.config.model.context_length

    def tokens(self, rows: list[dict]) -> np.ndarray:
        return np.array([r["step"] for r in rows], float) * self.tokens_per_step

    def start_time(self) -> float | None:
        """Wall-clock time of step 0, estimated from the first timed train row."""
        timed = [r for r in self.train if "time" in r and r.get("tokens_per_s")]
        if not timed:
            return None
        r = timed[0]
        return r["time"] - r["step"] * self.tokens_per_step / r["tokens_per_s"]

    def seconds(self, rows: list[dict]) -> np.ndarray | None:
        """Seconds since the start for each row: its own "time", else interpolated
        between the timed train rows (so an evaluation's time spreads over the
        steps after it)."""
        t0 = self.start_time()
        if t0 is None or not rows:
            return None
        timed = [(r["step"], r["time"] - t0) for r in self.train if "time" in r]
        steps, times = zip((0, 0.0), *timed)
        est = np.interp([r["step"] for r in rows], steps, times)
        return np.array(
            [r["time"] - t0 if "time" in r else e for r, e in zip(rows, est)]
        )


def load_run(log_dir: str | Path) -> Run:
    """Parse logs/<run>/ (metrics.jsonl and config.yaml); PlotError when absent."""
    d = Path(log_dir)
    metrics, config = d / "metrics.jsonl", d / "config.yaml"
    if not d.is_dir():
        raise PlotError(f"{d}: no such log folder")
    for f in (metrics, config):
        if not f.is_file():
            raise PlotError(f"{d}: no {f.name} there (not a training log folder?)")
    try:
        cfg = load_config(config)
    except ConfigError as e:
        raise PlotError(str(e)) from None
    run = Run(d, cfg)
    lists = {"train": run.train, "eval": run.evals, "sample": run.samples}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a kill -9
        if isinstance(row, dict) and row.get("event") in lists:
            lists[row["event"]].append(row)
    if not run.train:
        raise PlotError(f"{metrics}: no training steps logged yet")
    return run


def smooth(y: np.ndarray) -> np.ndarray:
    """Trailing mean over ~1/50 of the points (at least 1)."""
    k = max(1, len(y) // 50)
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:k] / np.arange(1, k)  # the first k-1 points: mean so far
    return np.concatenate([head, (c[k:] - c[:-k]) / k])


def plot_runs(runs: list[Run], out: str | Path) -> Path:
    """Draw the four panels for `runs` into a PNG at `out`; returns its path."""
    from matplotlib.figure import Figure  # Agg canvas; no pyplot global state

    fig = Figure(figsize=(12, 8), layout="constrained")
    ax_tok, ax_time, ax_lr, ax_tps = fig.subplots(2, 2).flat
    colors = [f"C{i % 10}" for i in range(len(runs))]
    longest = max(
        (s[-1] for r in runs if (s := r.seconds(r.train)) is not None), default=0
    )
    unit, scale = next((u, k) for u, k in TIME_UNITS if longest >= 2 * k or k == 1)
    for run, c in zip(runs, colors):
        train = [r for r in run.train if not r.get("skipped")]
        loss = np.array([r["loss"] for r in train])
        x_tok, secs = run.tokens(train), run.seconds(train)
        v_tok, v_secs = run.tokens(run.evals), run.seconds(run.evals)
        if secs is not None:
            secs, v_secs = secs / scale, v_secs / scale if run.evals else v_secs
        v_loss = [r["val_loss"] for r in run.evals]
        ax_tok.plot(x_tok, loss, color=c, alpha=0.2, lw=0.8)
        ax_tok.plot(x_tok, smooth(loss), color=c, label=f"{run.name} train")
        if run.evals:
            ax_tok.plot(v_tok, v_loss, "o--", color=c, label=f"{run.name} val")
        if secs is not None:
            ax_time.plot(secs, smooth(loss), color=c, label=f"{run.name} train")
            if run.evals:
                ax_time.plot(v_secs, v_loss, "o--", color=c, label=f"{run.name} val")
        ax_lr.plot(x_tok, [r["lr"] for r in train], color=c, label=run.name)
        rate = [r for r in run.train if r.get("tokens_per_s")]
        ax_tps.plot(
            run.tokens(rate), [r["tokens_per_s"] for r in rate], ".-", color=c,
            label=run.name,
        )  # fmt: skip
    if not any(r.start_time() for r in runs):
        ax_time.text(0.5, 0.5, "no timestamps in these logs", ha="center",
                     transform=ax_time.transAxes)  # fmt: skip
    labels = [
        (ax_tok, "tokens", "loss (nats/token)", "loss vs tokens"),
        (ax_time, f"wall time ({unit})", "loss (nats/token)", "loss vs wall time"),
        (ax_lr, "tokens", "learning rate", "learning rate"),
        (ax_tps, "tokens", "tokens/s", "throughput"),
    ]
    for ax, xl, yl, title in labels:
        ax.set(xlabel=xl, ylabel=yl, title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(", ".join(r.name for r in runs))
    out = Path(out)
    try:  # whole or absent; the format from the name, as savefig(path) does
        with atomic_file(out, "wb") as f:
            fig.savefig(f, dpi=100, format=out.suffix[1:] or None)
    except OSError as e:
        raise PlotError(write_failure(out, e)) from None
    return out


def default_out(runs: list[Run]) -> Path:
    """logs/<run>/training.png; several runs: logs/<first>/compare.png."""
    return runs[0].dir / (DEFAULT_PNG if len(runs) == 1 else "compare.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m src.plot",
        description="Plot train/validation loss against tokens and wall time, the "
        "learning rate and tokens/s of one or more runs (one figure, one colour "
        "per run) from logs/<run>/metrics.jsonl.",
        epilog="example: python -m src.plot logs/tiny logs/quickstart --out cmp.png",
    )
    p.add_argument("runs", nargs="+", metavar="LOG_DIR", help="e.g. logs/<run>")
    p.add_argument(
        "--out",
        metavar="PNG",
        help=f"output file (default: logs/<run>/{DEFAULT_PNG}, or "
        "logs/<first run>/compare.png for several runs)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> None:
        runs = [load_run(d) for d in args.runs]
        print(plot_runs(runs, args.out or default_out(runs)))

    # matplotlib refuses an --out of a kind it cannot write with a ValueError
    return cli.command(build_parser(), argv, run, catch=(OSError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())
