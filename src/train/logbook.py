"""A run's logs: the console, logs/<run>/train.log and logs/<run>/metrics.jsonl.

metrics.jsonl has one row per optimizer step ({"event": "train", "step", "loss",
"lr", "grad_norm", "skipped"}; rows at a logging boundary add tokens/s, memory and
wall time), one per validation ({"event": "eval", ...}) and per sample. The loop
hands over steps as `StepRecord`s of lazy arrays and they are written at logging
boundaries, so it never waits on `.item()` in between. Each session of a run
(the first start and every resume) begins with `begin(step)`: rows past the
checkpoint's step are dropped, so the log has no duplicated or missing steps, and
the session's first step row carries `"start": step` (plots break their lines
there, and leave its tokens/s out: it includes compiling the step). Every row
also goes to the run's experiment trackers (`logging.report_to`,
`src.train.reporters`), which never fail the run. Ranks other than 0 keep a
`FollowerLog`: the same bookkeeping, nothing written or reported.

train.log and the console get the same lines (setup, "step N: loss ..." at each
logging boundary, validation, samples, warnings). The progress bar
(`logging.progress_bar`) is drawn below them only when stderr is a terminal, so
a redirected console gets plain lines, never carriage-return redraws.

A log is never why a run crashes: a write that fails (a full disk, an I/O error)
is kept as `failure`, the first one, in user terms (`src.files.write_failure`),
and the console goes on; the loop polls `failure` each step, saves and stops. A
console that goes away (a closed pipe) is only dropped: train.log has every line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from ..config import Config
from ..files import atomic_file, write_failure
from .reporters import Reporters, open_reporters


@dataclass
class StepRecord:
    """One optimizer step, as the loop keeps it until the next log flush (lazy
    arrays: reading them would wait for the step)."""

    step: int  # steps done after this one
    loss: mx.array
    grad_norm: mx.array
    ok: mx.array  # False: non-finite, the update was skipped
    lr: mx.array


class _Console:
    """sys.stderr for the log lines and the progress bar, dropped at the first
    write that fails (e.g. `... 2>&1 | head` has exited)."""

    def __init__(self):
        self.alive = True

    def _do(self, action, *args) -> None:
        if self.alive:
            try:
                action(*args)
            except OSError:
                self.alive = False

    def write(self, text: str) -> None:
        self._do(sys.stderr.write, text)

    def flush(self) -> None:
        self._do(sys.stderr.flush)

    def isatty(self) -> bool:
        try:
            return self.alive and sys.stderr.isatty()
        except (OSError, ValueError):  # closed, or replaced by something odd
            return False

    def __getattr__(self, name):  # what else tqdm asks of a file: encoding...
        return getattr(sys.stderr, name)


class RunLog:
    def __init__(self, log_dir: Path, progress_bar: bool = True):
        self.dir = Path(log_dir)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.text_path = self.dir / "train.log"
        self.progress_bar = progress_bar
        self.loss_ema: float | None = None
        self.failure: str | None = None  # the first write that failed, said for people
        self.console = _Console()
        self.session_start: int | None = None  # the step this session started from
        self.reporters = Reporters([], self.warn)  # none until `report_to`

    def _guard(self, path: Path, write: Callable[[], None]) -> None:
        """Run `write` (of `path`); an OSError becomes `failure` instead of a crash."""
        try:
            write()
        except OSError as exc:
            self.failure = self.failure or write_failure(path, exc)

    # -- console and train.log
    def _emit(self, line: str) -> None:
        tqdm.write(line, file=self.console)
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n"

        def write() -> None:  # text from outside (e.g. prompts) may not be UTF-8
            with open(
                self.text_path, "a", encoding="utf-8", errors="backslashreplace"
            ) as f:
                f.write(stamped)

        self._guard(self.text_path, write)

    def info(self, msg: str) -> None:
        self._emit(msg)

    def warn(self, msg: str) -> None:
        self._emit(f"warning: {msg}")

    def error(self, msg: str) -> None:
        self._emit(f"error: {msg}")

    def write_config(self, text: str) -> None:
        path = self.dir / "config.yaml"

        def write() -> None:
            with atomic_file(path, "w") as f:
                f.write(text)

        self._guard(path, write)

    def progress(self, start: int, total: int) -> tqdm:
        """The step bar: drawn only when `progress_bar` is on and stderr is a
        terminal (redirected, the console gets train.log's plain lines instead)."""
        return tqdm(
            total=total,
            initial=start,
            desc="train",
            unit="step",
            disable=not (self.progress_bar and self.console.isatty()),
            dynamic_ncols=True,
            file=self.console,
        )

    def first_step(self, bar: tqdm, step: int, compiled_in: float | None) -> None:
        """After the first step of the run (`step` done), which compiled the step
        function in `compiled_in` seconds (None: not compiled): say how long that
        took, and set the bar to `step` with its rate and ETA counted from now."""
        if compiled_in is not None:
            self.info(f"compiled in {compiled_in:.1f} s")
        if bar.disable:
            return
        bar.reset()  # n = 0; the clock and the rate's averages start now
        bar.initial = bar.n = bar.last_print_n = step
        bar.refresh()

    # -- experiment trackers
    def report_to(self, cfg: Config) -> None:
        """Open the trackers of `logging.report_to` (`src.train.reporters`): every
        row written from now on goes to them too. ConfigError when a package
        is not installed."""
        self.reporters = open_reporters(cfg, self.dir, self.info, self.warn)

    def close(self, exit_code: int) -> None:
        """Close the experiment trackers, telling them the run's exit code;
        never raises an Exception (metrics.jsonl is closed after each write)."""
        self.reporters.close(exit_code)

    # -- metrics.jsonl
    def _append(self, rows: list[dict]) -> None:
        def write() -> None:  # json.dumps escapes non-ASCII: any text is safe
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))
                f.flush()
                os.fsync(f.fileno())

        self._guard(self.metrics_path, write)
        self.reporters.write(rows)  # also when the file failed: they may not

    def begin(self, step: int) -> None:
        """A session of the run starts with `step` steps done (0: a fresh start):
        drop rows past it, mark the session's first step row with it, and hand
        the rows kept to the reporters."""
        self.truncate_after(step)
        self.session_start = step
        if self.reporters:
            try:
                rows = self._rows() if self.metrics_path.exists() else []
            except OSError:  # said by truncate_after already (`failure`)
                rows = []
            self.reporters.begin(rows)

    def _rows(self) -> list[dict]:
        """The rows of metrics.jsonl (a torn line skipped)."""
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a kill -9 or a full disk
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def truncate_after(self, step: int) -> None:
        """Drop rows for steps > `step` (written after the checkpoint we resume from)."""
        if self.metrics_path.exists():
            self._guard(self.metrics_path, lambda: self._keep_until(step))

    def _keep_until(self, step: int) -> None:
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a kill -9 or a full disk
            if row.get("step", 0) <= step:
                keep.append(line + "\n")
        with atomic_file(self.metrics_path, "w") as f:
            f.write("".join(keep))

    def flush_steps(
        self,
        pending: list[StepRecord],
        tokens_per_s: float,
        spike_factor: float,
        bar: tqdm,
    ) -> None:
        """Write buffered step rows; warn about skipped steps and loss spikes."""
        if not pending:
            return
        steps = [p.step for p in pending]
        values = mx.stack(
            [
                mx.stack([p.loss, p.grad_norm, p.ok.astype(mx.float32), p.lr])
                for p in pending
            ]
        ).tolist()
        rows = []
        for step, (loss, gnorm, ok, lr) in zip(steps, values):
            row = {
                "event": "train",
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": gnorm,
                "skipped": not ok,
            }
            if self.session_start is not None and step == self.session_start + 1:
                row["start"] = self.session_start
            if not ok:
                self.warn(f"step {step}: non-finite loss or gradient; update skipped")
            else:
                if self.loss_ema is not None and loss > spike_factor * self.loss_ema:
                    self.warn(
                        f"step {step}: loss spike {loss:.4f} "
                        f"(moving average {self.loss_ema:.4f})"
                    )
                ema = self.loss_ema
                self.loss_ema = loss if ema is None else 0.95 * ema + 0.05 * loss
            rows.append(row)
        rows[-1]["tokens_per_s"] = tokens_per_s
        rows[-1]["peak_memory"] = mx.get_peak_memory()
        rows[-1]["time"] = time.time()  # wall clock, for plots against time
        self._append(rows)
        last = rows[-1]
        bar.set_postfix(
            loss=f"{last['loss']:.4f}",
            lr=f"{last['lr']:.2e}",
            tok_s=f"{tokens_per_s:,.0f}",
            refresh=False,
        )
        self.info(  # train.log has every logged step, whatever the console shows
            f"step {last['step']}: loss {last['loss']:.4f} lr {last['lr']:.2e} "
            f"grad_norm {last['grad_norm']:.3f} {tokens_per_s:,.0f} tok/s"
        )

    def eval_row(self, step: int, metrics: dict) -> None:
        self._append([{"event": "eval", "step": step, "time": time.time(), **metrics}])
        moe = metrics.get("val_moe_aux")
        self.info(
            f"step {step}: val loss {metrics['val_loss']:.4f} "
            f"ppl {metrics['val_ppl']:.2f} bpb {metrics['val_bpb']:.4f}"
            + (f" moe aux {moe:.3f} (1 = balanced)" if moe is not None else "")
        )

    def sample(self, step: int, prompt: str, text: str) -> None:
        self._append(
            [{"event": "sample", "step": step, "prompt": prompt, "text": text}]
        )
        self.info(f"sample: {prompt!r} -> {text!r}")


class FollowerLog(RunLog):
    """The log of ranks other than 0: the same bookkeeping, nothing written (so it
    never fails: rank 0's failure reaches them through the step's stop flag)."""

    def __init__(self):
        super().__init__(Path(os.devnull), progress_bar=False)

    def _emit(self, line: str) -> None:
        pass

    def _append(self, rows: list[dict]) -> None:
        pass

    def write_config(self, text: str) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def report_to(self, cfg: Config) -> None:
        pass
