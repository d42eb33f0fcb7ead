"""The learning-rate schedule: a linear warm-up, then a cosine decay to
`learning_rate * min_lr_ratio` at `max_steps`, as a function of the number of
updates already applied (the optimizer's own step count, saved with its state,
so a resumed run continues the schedule where it was)."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from ..config import TrainingConfig

Schedule = Callable[[mx.array], mx.array]


def lr_schedule(cfg: TrainingConfig) -> Schedule:
    """lr(step) for step = number of updates already applied (0-based)."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup, total = cfg.warmup_steps, cfg.max_steps

    def schedule(step: mx.array) -> mx.array:
        step = step.astype(mx.float32)
        # warm-up starts at peak/warmup rather than 0 so the first step is not wasted
        warm = peak * (step + 1) / max(warmup, 1)
        progress = mx.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = floor + 0.5 * (peak - floor) * (1 + mx.cos(math.pi * progress))
        return mx.where(step < warmup, warm, cosine)

    return schedule
