"""Train for a wall-clock budget: `training.time_budget_minutes`.

A learning-rate schedule needs its length in steps, and exact resume needs that
length fixed. So the budget is turned into `training.max_steps` once, before
training: a throwaway copy of the model takes a few compiled steps and one
validation batch on random tokens, and the step count is what fits in the time
left after start-up, counting the periodic validations and samples. The result is
written into the run's config (and so into every checkpoint); a resumed run keeps
the checkpoint's step count instead of measuring again.
"""

from __future__ import annotations

import math
import statistics
import time

import mlx.core as mx

from ..config import Config
from ..inference.generate import generate_tokens
from .assembly import assemble
from .distributed import ONE_PROCESS, Dist

TIMED_STEPS = 5  # after 2 untimed ones (compilation, allocator warm-up)
# Room for the loop's own costs (data, logging, checkpoints) and for steps that run
# a little slower than the first timed ones (see docs/speedrun.md).
MARGIN = 0.96


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def steps_for_budget(
    cfg: Config, seconds_left: float, dist: Dist = ONE_PROCESS
) -> tuple[int, float, float]:
    """(steps of `cfg` that fit in `seconds_left` on this machine, seconds per
    step, seconds per validation with its samples). With data-parallel ranks,
    every rank must call it (the timed steps include the gradient all-reduce)."""
    m, t, e = cfg.model, cfg.training, cfg.eval
    parts = assemble(cfg, dist.group, compile=True)
    model, optimizer, step = parts.model, parts.optimizer, parts.train_step
    accum = dist.local_accum(t.grad_accum_steps)
    tokens = mx.random.randint(
        0, m.vocab_size, (accum, t.batch_size, m.context_length + 1)
    )

    def train_step():
        out = step(tokens)
        mx.eval(out, model.state, optimizer.state)

    for _ in range(2):
        train_step()
    per_step = _median_seconds(train_step, TIMED_STEPS)

    per_eval = 0.0
    if e.interval:
        model.eval()
        eval_fn = parts.eval_fn
        mx.eval(eval_fn(tokens[0]))
        batches = math.ceil(e.max_tokens / (t.batch_size * m.context_length))
        per_eval = batches * _median_seconds(lambda: mx.eval(eval_fn(tokens[0])), 2)
        per_eval *= max(1, len(m.matformer_widths))  # MatFormer: every width
        if e.sample_tokens and e.sample_prompts:
            sample = _median_seconds(
                lambda: list(generate_tokens(model, [1], e.sample_tokens, 0.0)), 1
            )
            per_eval += sample * len(e.sample_prompts)
    # n steps take n * per_step + (n / interval) * per_eval, plus one final eval
    per_step_all = per_step + (per_eval / e.interval if e.interval else 0.0)
    steps = int(MARGIN * (seconds_left - per_eval) / per_step_all)
    return max(1, steps), per_step, per_eval


def fix_max_steps(
    cfg: Config, resume_meta: dict | None, dist: Dist, elapsed: float
) -> str:
    """Set cfg.training.max_steps for the time budget, `elapsed` seconds of which are
    spent: a resumed run's own step count, else what fits (rank 0's measurement on
    every rank of a data-parallel `dist`). Returns the line to log."""
    t = cfg.training
    meta = resume_meta
    kept = dist.agree(meta["config"]["training"]["max_steps"] if meta else 0)
    if kept:
        t.max_steps = kept
        return f"time budget: the resumed run keeps its {kept} steps"
    left = t.time_budget_minutes * 60 - elapsed
    steps, per_step, per_eval = steps_for_budget(cfg, left, dist)
    t.max_steps = dist.agree(steps)
    return (
        f"time budget {t.time_budget_minutes:g} min: {t.max_steps} steps fit in the "
        f"{left:.0f} s left ({per_step:.3f} s/step, {per_eval:.1f} s per validation, "
        "measured)"
    )
