"""Run bookkeeping for the trainer: console and file logs, metrics, stop signals,
and the resume compatibility check.

logs/<run>/metrics.jsonl has one row per optimizer step ({"event": "train", "step",
"loss", "lr", "grad_norm", "skipped"}; rows at a logging boundary add tokens/s and
memory), one per validation ({"event": "eval", ...}) and per sample. Rows are
buffered as lazy arrays and written at logging boundaries, so the step loop never
waits on `.item()` in between. On resume, rows past the checkpoint's step are
dropped so the log has no duplicated or missing steps.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from .config import Config, ConfigError


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


class RunLog:
    def __init__(self, log_dir: Path, progress_bar: bool = True):
        self.dir = Path(log_dir)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.text_path = self.dir / "train.log"
        self.progress_bar = progress_bar
        self.loss_ema: float | None = None

    # -- console and train.log
    def _emit(self, line: str) -> None:
        tqdm.write(line, file=sys.stderr)
        with open(self.text_path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def info(self, msg: str) -> None:
        self._emit(msg)

    def warn(self, msg: str) -> None:
        self._emit(f"warning: {msg}")

    def error(self, msg: str) -> None:
        self._emit(f"error: {msg}")

    def write_config(self, text: str) -> None:
        (self.dir / "config.yaml").write_text(text, encoding="utf-8")

    def progress(self, start: int, total: int) -> tqdm:
        return tqdm(
            total=total,
            initial=start,
            desc="train",
            unit="step",
            disable=not self.progress_bar,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    # -- metrics.jsonl
    def _append(self, rows: list[dict]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop rows for steps > `step` (written after the checkpoint we resume from)."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a kill -9
            if row.get("step", 0) <= step:
                keep.append(line + "\n")
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def flush_steps(
        self, pending, tokens_per_s, consecutive_bad, spike_factor, bar
    ) -> int:
        """Write buffered step rows; warn about skipped steps and loss spikes.

        Returns the updated count of consecutive non-finite (skipped) steps."""
        if not pending:
            return consecutive_bad
        steps = [p[0] for p in pending]
        values = mx.stack(
            [mx.stack([p[1], p[2], p[3].astype(mx.float32), p[4]]) for p in pending]
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
            if not ok:
                consecutive_bad += 1
                self.warn(f"step {step}: non-finite loss or gradient; update skipped")
            else:
                consecutive_bad = 0
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
        if not bar.disable:
            return consecutive_bad
        self.info(
            f"step {last['step']}: loss {last['loss']:.4f} lr {last['lr']:.2e} "
            f"grad_norm {last['grad_norm']:.3f} {tokens_per_s:,.0f} tok/s"
        )
        return consecutive_bad

    def eval_row(self, step: int, metrics: dict) -> None:
        self._append([{"event": "eval", "step": step, "time": time.time(), **metrics}])
        self.info(
            f"step {step}: val loss {metrics['val_loss']:.4f} "
            f"ppl {metrics['val_ppl']:.2f} bpb {metrics['val_bpb']:.4f}"
        )

    def sample(self, step: int, prompt: str, text: str) -> None:
        self._append(
            [{"event": "sample", "step": step, "prompt": prompt, "text": text}]
        )
        self.info(f"sample: {prompt!r} -> {text!r}")


class StopSignal:
    """SIGINT/SIGTERM set `requested` (the loop saves at the next step boundary and
    exits 0); a second SIGINT exits at once with 130."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            os._exit(130)  # checkpoints are atomic: the last committed one is intact
        self.requested = True
        print(
            f"\nreceived {signal.Signals(signum).name}: saving at the end of this step "
            "(Ctrl-C again to quit now)",
            file=sys.stderr,
        )

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# Keys that must not change across a resume: the saved tensors' shapes, the
# token stream, and the batch (which defines the data position of every step).
# Regularization and memory knobs may change freely.
_FROZEN = ("model.", "training.batch_size", "training.grad_accum_steps")
_FREE = ("model.dropout", "model.gradient_checkpointing", "model.init_std")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_compatible(
    meta: dict, cfg: Config, tokenizer_sha256: str, world_size: int = 1
) -> None:
    """Raise ConfigError listing every frozen key whose value differs, and a change
    in the number of data-parallel ranks."""
    old, new = _flatten(meta.get("config", {})), _flatten(cfg.to_dict())
    diffs = [
        f"  {k}: checkpoint {old.get(k)!r} -> now {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k.startswith(_FROZEN) and k not in _FREE and old.get(k) != new.get(k)
    ]
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        diffs.append(
            f"  tokenizer sha256: checkpoint {meta.get('tokenizer_sha256')} "
            f"-> now {tokenizer_sha256}"
        )
    if meta.get("world_size", 1) != world_size:
        diffs.append(
            f"  world size (data-parallel ranks): checkpoint {meta.get('world_size')} "
            f"-> now {world_size} (resume with as many ranks as the checkpoint)"
        )
    if diffs:
        raise ConfigError(
            "cannot resume: the run changed since the checkpoint\n" + "\n".join(diffs)
        )
