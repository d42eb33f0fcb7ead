"""The learning-rate schedule, as a function of the run's step (the number of
updates the run has applied, 0-based), not of the optimizer's own count: a run
resumed from a checkpoint without optimizer state continues where it was
(`TrainOptimizer.follow_run_step`).

Both shapes start with a linear warm-up to `learning_rate` over `warmup_steps`,
then (`training.schedule`):
- cosine: a cosine decay to `learning_rate * min_lr_ratio` at `max_steps`;
- wsd (warmup-stable-decay): constant at `learning_rate`, then a linear decay to
  the same floor over the last `decay_fraction` of `max_steps` (never starting
  before the warm-up ends). A longer `max_steps` only moves the decay later, so a
  run extended before its decay began continues without a change of lr.
Both reach the floor at step `max_steps` (one past the last update).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from ..config import TrainingConfig

Schedule = Callable[[mx.array], mx.array]


def decay_start(cfg: TrainingConfig) -> int:
    """wsd: the step where the linear decay begins (the last one at the peak)."""
    decay = round(cfg.decay_fraction * cfg.max_steps)
    return max(cfg.warmup_steps, cfg.max_steps - decay)


def lr_schedule(cfg: TrainingConfig) -> Schedule:
    """lr(step) for step = number of updates already applied (0-based)."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup, total = cfg.warmup_steps, cfg.max_steps
    start = decay_start(cfg)

    def cosine(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        # warm-up starts at peak/warmup rather than 0 so the first step is not wasted
        warm = peak * (step + 1) / max(warmup, 1)
        progress = mx.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        decayed = floor + 0.5 * (peak - floor) * (1 + mx.cos(math.pi * progress))
        return mx.where(step < warmup, warm, decayed)

    def wsd(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        warm = peak * (step + 1) / max(warmup, 1)
        progress = mx.clip((step - start) / max(total - start, 1), 0.0, 1.0)
        return mx.where(step < warmup, warm, peak + (floor - peak) * progress)

    return wsd if cfg.schedule == "wsd" else cosine


def lr_at(cfg: TrainingConfig, step: int) -> float:
    """The learning rate of update `step` under `cfg`'s schedule, as a float."""
    return lr_schedule(cfg)(mx.array(step)).item()
