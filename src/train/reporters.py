"""Experiment trackers that mirror the run's metrics.jsonl: `logging.report_to`.

Each reporter gets the rows the logbook appends (`src.train.logbook`), keyed by
their step: a train row gives `train/loss`, `train/lr`, `train/grad_norm` and, at
logging boundaries, `train/tokens_per_s` (not on a session's first row, whose
time includes compiling the step) and `train/peak_memory`; a validation row
gives `val/loss`, `val/ppl`, `val/bpb`...; samples are text (W&B only).

- tensorboard: logs/<run>/tensorboard/events.out.tfevents.*, written by the
  `tensorboard` package's own numpy-only `tensorboard.summary.Writer` (neither
  torch nor TensorFlow). The event file is a view of metrics.jsonl: each session
  replaces the earlier event files with one holding the rows metrics.jsonl kept
  (`begin`), so the steps an interrupted session logged past its last checkpoint
  are not shown twice (that writer cannot mark a restart for TensorBoard to
  purge them).
- wandb: `wandb.init(project=logging.wandb_project, name=run_name, config=the
  resolved config, dir=logs/<run>)`, one W&B run per session; `WANDB_MODE`
  (offline, disabled) and the other `WANDB_*` variables are the user's. W&B's
  console capture is off unless `WANDB_CONSOLE` says otherwise: train.log has
  every console line already.

A tracker is a courtesy: an exception from one (opening, writing or closing) is
one warning, and that tracker is off for the rest of the run; metrics.jsonl has
every row. Only a package that is not installed is an error, at the start
(`require`). The packages are imported here only when a run asks for them.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from pathlib import Path

from ..config import Config
from ..errors import ConfigError

INSTALL = "pip install -e '.[monitor]'"
FOLDERS = ("tensorboard", "wandb")  # what the trackers write in logs/<run>/
MODULES = {"tensorboard": "tensorboard.summary", "wandb": "wandb"}  # what each needs
TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory")


def require(names: list[str]) -> None:
    """ConfigError when a package `names` needs is not installed or cannot be
    imported (e.g. a dependency of it is missing)."""
    problems = []
    for name in names:
        module = MODULES[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if exc.name in (module.split(".")[0], module):
                problems.append(f"{name} is not installed")
            else:
                problems.append(f"{name} cannot be imported ({exc})")
        except Exception as exc:  # a broken install: say so, not a traceback
            problems.append(f"{name} cannot be imported ({type(exc).__name__}: {exc})")
    if problems:
        raise ConfigError(
            f"logging.report_to={names!r}: {'; '.join(problems)}; install the "
            f"monitor extra: {INSTALL}"
        )


def scalars(row: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl row, as tracker tags ("train/loss")."""
    if row.get("event") == "train":
        keys = [k for k in TRAIN_KEYS if k in row]
        if "start" in row:  # the session's first step: compiled, not a rate
            keys = [k for k in keys if k != "tokens_per_s"]
        return {f"train/{k}": float(row[k]) for k in keys}
    if row.get("event") == "eval":
        return {
            f"val/{k[4:]}": float(v)
            for k, v in row.items()
            if k.startswith("val_") and isinstance(v, (int, float))
        }
    return {}


class TensorBoard:
    name = "tensorboard"

    def __init__(self, log_dir: Path):
        from tensorboard.summary import Writer

        self.where = log_dir / FOLDERS[0]
        self.Writer, self.writer = Writer, None

    def begin(self, rows: list[dict]) -> None:
        """Start the session's event file with `rows`, the run's rows so far;
        earlier event files go (they may hold steps metrics.jsonl dropped)."""
        for old in self.where.glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = self.Writer(str(self.where))
        self.write(rows)

    def write(self, rows: list[dict]) -> None:
        if self.writer is None:  # rows before `begin`: it will write them
            return
        for row, when in zip(rows, _times(rows)):
            for tag, value in scalars(row).items():
                self.writer.add_scalar(tag, value, row["step"], wall_time=when)
        self.writer.flush()

    def close(self, exit_code: int) -> None:
        if self.writer is not None:
            self.writer.close()


def _times(rows: list[dict]) -> list[float | None]:
    """Each row's wall time: its own "time", else the next timed row's (the step
    rows between logging boundaries are written with the next boundary)."""
    out, later = [], None
    for row in reversed(rows):
        later = row.get("time", later)
        out.append(later)
    return out[::-1]


class WandB:
    name = "wandb"

    def __init__(self, cfg: Config, log_dir: Path):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.logging.wandb_project,
            name=cfg.run_name,
            config=cfg.to_dict(),
            dir=str(log_dir),
            settings=wandb.Settings(console=os.environ.get("WANDB_CONSOLE", "off")),
        )
        if self.run.disabled:
            self.where = "disabled (WANDB_MODE=disabled)"
        elif self.run.offline:  # run.dir: logs/<run>/wandb/offline-run-.../files
            self.where = Path(self.run.dir).parent
        else:
            self.where = self.run.url
        self.samples: list[list] = []

    def begin(self, rows: list[dict]) -> None:
        pass  # one W&B run per session: the earlier sessions have their rows

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            data: dict = scalars(row)
            if row.get("event") == "sample":  # every sample so far, newest last
                self.samples.append([row["step"], row["prompt"], row["text"]])
                data["samples"] = self.wandb.Table(
                    columns=["step", "prompt", "text"], data=self.samples
                )
            data = {k: v for k, v in data.items() if not _non_finite(v)}
            if data:
                self.run.log(data, step=row["step"])

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


def _non_finite(v) -> bool:
    """W&B charts break on NaN/inf (a skipped step): those points are left out."""
    return isinstance(v, float) and not math.isfinite(v)


class Reporters:
    """The run's trackers as one: `begin`, `write` and `close` go to each one
    still on; an exception from one is a warning (through `warn`) and switches
    it off."""

    def __init__(self, reporters: list, warn: Callable[[str], None]):
        self.active = list(reporters)
        self.warn = warn

    def __bool__(self) -> bool:
        return bool(self.active)

    def begin(self, rows: list[dict]) -> None:
        """A session starts; `rows`: what metrics.jsonl holds from earlier ones."""
        self._each("starting", lambda r: r.begin(rows))

    def write(self, rows: list[dict]) -> None:
        self._each("writing", lambda r: r.write(rows))

    def _each(self, doing: str, action: Callable) -> None:
        for r in list(self.active):
            try:
                action(r)
            except Exception as exc:  # any bug or I/O error of a tracker
                self._off(r, doing, exc)

    def _off(self, r, doing: str, exc: Exception) -> None:
        self.active.remove(r)
        self.warn(
            f"{r.name}: {type(exc).__name__} while {doing}: {exc}; no more reporting "
            f"to {r.name} in this run (metrics.jsonl has every row)"
        )
        try:
            r.close(1)
        except Exception:
            pass  # said once already

    def close(self, exit_code: int = 0) -> None:
        """Close every tracker still on (each once); never raises an Exception."""
        active, self.active = self.active, []
        for r in active:
            try:
                r.close(exit_code)
            except Exception as exc:
                self.warn(f"{r.name}: {type(exc).__name__} while closing: {exc}")


def open_reporters(
    cfg: Config,
    log_dir: Path,
    info: Callable[[str], None],
    warn: Callable[[str], None],
) -> Reporters:
    """The trackers `cfg.logging.report_to` names, writing under `log_dir`; says
    where each writes (`info`). A missing package is a ConfigError; one that
    fails to open is a warning and left out."""
    names = cfg.logging.report_to
    require(names)
    opened = []
    for name in names:
        try:
            r = TensorBoard(log_dir) if name == "tensorboard" else WandB(cfg, log_dir)
        except Exception as exc:
            warn(
                f"{name}: {type(exc).__name__} while opening: {exc}; not reporting to it"
            )
            continue
        info(f"reporting to {name}: {r.where}")
        opened.append(r)
    return Reporters(opened, warn)
