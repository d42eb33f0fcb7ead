"""Training curves from run logs: `python -m src.plot logs/<run> [logs/<run2> ...]`.

One PNG with four panels: train and validation loss against steps (tokens on the
top axis when the runs agree on tokens per step) and against wall time, the
learning rate, and tokens/s against steps; several runs share the figure (one
colour per run). Reads logs/<run>/metrics.jsonl and logs/<run>/config.yaml only
(and checkpoints/<run>/best.json when it is where the config says); no MLX here,
and matplotlib draws on its Agg canvas (no display, no pyplot state). The PNG is
written whole or not at all; a failed write names it (`PlotError`).

- Sessions: a resumed run appends to metrics.jsonl; each session's first step
  row carries `"start": <step it resumed from>` (older logs: a row whose step is
  not the previous step + 1). Every line breaks there (a NaN point) and a dotted
  vertical line marks the resume.
- Best: a star at the best checkpoint's step and validation loss (best.json),
  else at the lowest validation loss of the log.
- Throughput leaves out each session's first step row: its time includes
  compiling the step (the trainer keeps it out of tokens/s unless a logging
  boundary falls on it).

Tokens at step s = s * batch_size * grad_accum_steps * context_length. Wall time
comes from the "time" field (time.time()) of logging and eval rows: seconds since
the run started, each session's start estimated as its first logging row's time
minus its steps at its tokens/s, so a resume shows its pause. Logs without "time"
fields (older runs) get no time panel data.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import cli
from .config import Config, load_config
from .errors import ConfigError, PlotError
from .files import atomic_file, write_failure

DEFAULT_PNG = "training.png"
TIME_UNITS = (("h", 3600.0), ("min", 60.0), ("s", 1.0))  # the first >= 2 units
TITLES = ("loss vs steps", "loss vs wall time", "learning rate", "throughput")


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

    def starts(self) -> list[int]:
        """The step each session of the run started from, ascending: a row's
        "start", else (older logs) a step that does not follow the previous one."""
        out: list[int] = []
        prev = None
        for r in self.train:
            start = r.get("start")
            if start is None and (prev is None or r["step"] != prev + 1):
                start = r["step"] - 1
            if start is not None and (not out or start > out[-1]):
                out.append(int(start))
            prev = r["step"]
        return out

    def resumes(self) -> list[int]:
        """The steps the run was resumed from (the sessions but the first)."""
        return self.starts()[1:]

    def session(self, rows: list[dict]) -> list[int]:
        """The session of each row: the last one that started before its step."""
        starts = self.starts()
        return [max(0, bisect.bisect_left(starts, r["step"]) - 1) for r in rows]

    def rate_rows(self) -> list[dict]:
        """The train rows with a tokens/s, but a session's first step (compiling)."""
        firsts = {s + 1 for s in self.starts()}
        return [
            r for r in self.train if r.get("tokens_per_s") and r["step"] not in firsts
        ]

    def best(self) -> dict | None:
        """The eval row of the best checkpoint (checkpoints/<run>/best.json, when
        the config's folder has it and the log has that step), else of the lowest
        finite validation loss; None without validation."""
        finite = [r for r in self.evals if math.isfinite(r["val_loss"])]
        path = Path(self.config.checkpoint.dir) / self.config.run_name / "best.json"
        try:
            step = int(json.loads(path.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = None
        saved = [r for r in finite if r["step"] == step]
        return (
            saved[-1]
            if saved
            else min(finite, key=lambda r: r["val_loss"], default=None)
        )

    def _clocks(self) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per session, the (steps, wall times) its rows' times are interpolated
        between: its estimated start (its first timed train row's time minus its
        steps at its tokens/s), then its timed train rows; None for a session
        without a timed row."""
        starts = self.starts()
        timed: list[list[dict]] = [[] for _ in starts]
        for r, k in zip(self.train, self.session(self.train)):
            if "time" in r:
                timed[k].append(r)
        out = []
        for start, rows in zip(starts, timed):
            first = next((r for r in rows if r.get("tokens_per_s")), None)
            if first is None:
                out.append(None)
                continue
            took = (
                (first["step"] - start) * self.tokens_per_step / first["tokens_per_s"]
            )
            steps = [start] + [r["step"] for r in rows]
            times = [first["time"] - took] + [r["time"] for r in rows]
            out.append((np.array(steps, float), np.array(times)))
        return out

    def start_time(self) -> float | None:
        """Wall-clock time of the run's start: its first session's, else the first
        that can be estimated."""
        return next((c[1][0] for c in self._clocks() if c is not None), None)

    def seconds(self, rows: list[dict]) -> np.ndarray | None:
        """Seconds since the start for each row: its own "time", else interpolated
        between its session's start and timed train rows (so an evaluation's time
        spreads over the steps after it); NaN in a session with no timed row."""
        clocks = self._clocks()
        t0 = next((c[1][0] for c in clocks if c is not None), None)
        if t0 is None or not rows:
            return None
        ids = np.array(self.session(rows))
        steps = np.array([r["step"] for r in rows], float)
        out = np.full(len(rows), np.nan)
        for k, clock in enumerate(clocks):
            if clock is not None:
                out[ids == k] = np.interp(steps[ids == k], *clock) - t0
        own = [i for i, r in enumerate(rows) if "time" in r]
        out[own] = [rows[i]["time"] - t0 for i in own]
        return out


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


def broken(x, y, sessions: list[int], fn=None) -> tuple[np.ndarray, np.ndarray]:
    """x and y with a NaN point where the session changes, so a line breaks
    there; `fn` (e.g. `smooth`) applies to each session's y on its own."""
    xs, ys = [], []
    x, y, sessions = np.asarray(x, float), np.asarray(y, float), np.asarray(sessions)
    for k in dict.fromkeys(sessions.tolist()):
        part = sessions == k
        if xs:
            xs.append([math.nan])
            ys.append([math.nan])
        xs.append(x[part])
        ys.append(fn(y[part]) if fn else y[part])
    if not xs:
        return np.array([]), np.array([])
    return np.concatenate(xs), np.concatenate(ys)


def build_figure(runs: list[Run]):
    """The figure of `runs`: a matplotlib Figure whose axes are, in order, loss
    against steps, loss against wall time, the learning rate and tokens/s (their
    titles are `TITLES`)."""
    from matplotlib.figure import Figure  # Agg canvas; no pyplot global state

    fig = Figure(figsize=(12, 8), layout="constrained")
    ax_loss, ax_time, ax_lr, ax_tps = fig.subplots(2, 2).flat
    colors = [f"C{i % 10}" for i in range(len(runs))]
    longest = max((np.nanmax(s) for r in runs if (s := r.seconds(r.train)) is not None
                   and np.isfinite(s).any()), default=0)  # fmt: skip
    unit, scale = next((u, k) for u, k in TIME_UNITS if longest >= 2 * k or k == 1)
    per_step = {r.tokens_per_step for r in runs}
    for run, c in zip(runs, colors):
        name = (
            run.name
            if len(per_step) == 1
            else f"{run.name} ({run.tokens_per_step:,} tok/step)"
        )
        train = [r for r in run.train if not r.get("skipped")]
        steps, loss = [r["step"] for r in train], [r["loss"] for r in train]
        ids, v_ids = run.session(train), run.session(run.evals)
        v_steps, v_loss = (
            [r["step"] for r in run.evals],
            [r["val_loss"] for r in run.evals],
        )
        ax_loss.plot(*broken(steps, loss, ids), color=c, alpha=0.2, lw=0.8,
                     label="_raw")  # fmt: skip
        ax_loss.plot(*broken(steps, loss, ids, smooth), color=c, label=f"{name} train")
        if run.evals:
            ax_loss.plot(*broken(v_steps, v_loss, v_ids), "o--", color=c,
                         label=f"{name} val")  # fmt: skip
        secs, v_secs = run.seconds(train), run.seconds(run.evals)
        if secs is not None:
            ax_time.plot(*broken(secs / scale, loss, ids, smooth), color=c,
                         label=f"{name} train")  # fmt: skip
            if run.evals:
                ax_time.plot(*broken(v_secs / scale, v_loss, v_ids), "o--", color=c,
                             label=f"{name} val")  # fmt: skip
        ax_lr.plot(*broken(steps, [r["lr"] for r in train], ids), color=c, label=name)
        rate = run.rate_rows()
        ax_tps.plot(*broken([r["step"] for r in rate], [r["tokens_per_s"] for r in rate],
                            run.session(rate)), ".-", color=c, label=name)  # fmt: skip
        if (best := run.best()) is not None:
            label = f"{run.name} best: step {best['step']}, val {best['val_loss']:.4f}"
            ax_loss.plot([best["step"]], [best["val_loss"]], "*", ms=14, color=c,
                         mec="black", label=label, zorder=5)  # fmt: skip
            if v_secs is not None:
                i = run.evals.index(best)
                ax_time.plot([v_secs[i] / scale], [best["val_loss"]], "*", ms=14,
                             color=c, mec="black", zorder=5)  # fmt: skip
        for i, step in enumerate(run.resumes()):
            for ax in (ax_loss, ax_lr, ax_tps):
                ax.axvline(step, color=c, ls=":", lw=1.2, label=(
                    f"{run.name} resumed" if ax is ax_loss and i == 0 else "_resume"))  # fmt: skip
    if not any(r.start_time() for r in runs):
        ax_time.text(0.5, 0.5, "no timestamps in these logs", ha="center",
                     transform=ax_time.transAxes)  # fmt: skip
    labels = [
        (ax_loss, "step", "loss (nats/token)"),
        (ax_time, f"wall time ({unit})", "loss (nats/token)"),
        (ax_lr, "step", "learning rate"),
        (ax_tps, "step", "tokens/s (compiling steps left out)"),
    ]
    for (ax, xl, yl), title in zip(labels, TITLES):
        ax.set(xlabel=xl, ylabel=yl, title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if len(per_step) == 1:  # one scale: tokens on top of the step panels
        k = per_step.pop()
        for ax in (ax_loss, ax_lr, ax_tps):
            top = ax.secondary_xaxis(
                "top", functions=(lambda s: s * k, lambda t: t / k)
            )
            top.set_xlabel("tokens")
    fig.suptitle(", ".join(r.name for r in runs))
    return fig


def plot_runs(runs: list[Run], out: str | Path) -> Path:
    """Draw the four panels for `runs` into a PNG at `out`; returns its path."""
    fig = build_figure(runs)
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
        description="Plot train/validation loss against steps (and tokens) and "
        "wall time, the learning rate and tokens/s of one or more runs (one "
        "figure, one colour per run) from logs/<run>/metrics.jsonl, with the best "
        "checkpoint starred and each resume a dotted line and a break.",
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
