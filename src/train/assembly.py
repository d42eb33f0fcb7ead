"""What a run trains, built in one place from its config: the model, the
optimizer (with its learning-rate schedule), the compute dtype and streams of the
execution policy, the compiled training step and the evaluation function.

The trainer, the time budget, the benchmark and the memory table all call
`assemble`, so what they time or measure is what a run executes. The masked
step and evaluation (chat SFT, `training.loss_on`) are built beside the plain
ones: which a run uses depends on its data, which the trainer sees
(`src.train.trainer.loss_on_assistant`); an `mx.compile` that is never called
costs nothing. Restoring a
checkpoint afterwards writes into the model and optimizer in place, which the
compiled step (holding their state containers) then sees.

MatFormer (`model.matformer_widths`): a width is a Python value a compiled
function keeps, so `training.matformer_loss: sample` gets one step per width
(`width_steps`; `step_for` picks step i's from (seed, i)), and validation one
evaluation function per narrower width (`width_evals`); `sum` gets one step
whose loss is the mean over the widths (`src.train.step`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..backend import policy
from ..config import Config
from ..eval.evaluator import LossSum, make_eval_fn
from ..model import matformer
from ..model.transformer import Model
from .memory import estimate_training_memory
from .optim import TrainOptimizer, build_optimizer
from .step import TrainStep, make_train_step


@dataclass
class Assembly:
    """A run's moving parts (see the module docstring)."""

    model: nn.Module
    optimizer: TrainOptimizer
    compute_dtype: mx.Dtype
    streams: list[mx.Stream]
    train_step: TrainStep  # batch (accum, B, L+1) -> (loss, grad norm, ok)
    eval_fn: LossSum  # batch (B, L+1) -> summed loss
    # the same with an assistant mask: (batch, mask) -> ... (chat SFT)
    masked_step: TrainStep | None = None
    masked_eval_fn: LossSum | None = None
    # MatFormer, sample: width -> its (plain, masked) step; empty otherwise
    width_steps: dict[float, tuple[TrainStep, TrainStep]] = field(default_factory=dict)
    # MatFormer: each width below 1.0 -> its (plain, masked) evaluation function
    width_evals: dict[float, tuple[LossSum, LossSum]] = field(default_factory=dict)
    seed: int = 0  # training.seed: sample-mode widths are drawn from (seed, step)

    def step_for(self, step: int, masked: bool = False) -> TrainStep:
        """The training step of optimizer step `step` (0-based): in MatFormer's
        sample mode, that of the width `matformer.sample_width` draws."""
        if not self.width_steps:
            return self.masked_step if masked else self.train_step
        widths = self.model.config.matformer_widths
        plain, with_mask = self.width_steps[
            matformer.sample_width(widths, self.seed, step)
        ]
        return with_mask if masked else plain

    def memory_estimate(self, cfg: Config) -> int:
        """The planning estimate of a step's peak bytes (src/train/memory.py)."""
        return estimate_training_memory(
            cfg.model, cfg.training.batch_size, self.optimizer.state_per_param
        )


def assemble(
    cfg: Config,
    group: mx.distributed.Group | None = None,
    model: nn.Module | None = None,
    compile: bool | None = None,
) -> Assembly:
    """Build a run of `cfg`: a fresh model (initialised from `training.seed`)
    unless `model` is given, its optimizer, and the step and evaluation functions
    (compiled per `training.compile` unless `compile` says otherwise). With a
    data-parallel `group`, the step averages over its ranks."""
    t = cfg.training
    if model is None:
        mx.random.seed(t.seed)
        model = Model(cfg.model)
    model.moe_aux_loss = t.moe_aux_loss  # the MoE balancing loss's weight (loss.py)
    optimizer = build_optimizer(model, t)
    compile = t.compile if compile is None else compile
    dtype = policy.compute_dtype(t.precision)
    world = group.size() if group is not None else 1
    streams = policy.streams(t.streams, world)
    widths = list(cfg.model.matformer_widths)
    sample = bool(widths) and t.matformer_loss == "sample"

    def steps(ws: tuple) -> tuple[TrainStep, TrainStep]:
        """The plain and the masked (chat SFT) step at widths `ws`."""
        args = (model, optimizer, t, dtype, compile, group, streams)
        return make_train_step(*args, False, ws), make_train_step(*args, True, ws)

    def evals(w: float | None) -> tuple[LossSum, LossSum]:
        """The plain and the masked evaluation function at width `w`."""
        fns = (make_eval_fn(model, compile, streams, m) for m in (False, True))
        return tuple(f if w is None else _at_width(model, w, f) for f in fns)

    # sample: the plain step is the whole model's (the benchmark times that one)
    step, masked = steps(tuple(widths) if widths and not sample else (None,))
    width_steps = {w: steps((w,)) for w in widths[:-1]} if sample else {}
    if sample:
        width_steps[widths[-1]] = (step, masked)  # 1.0: the whole model
    eval_fn, masked_eval = evals(None)
    width_evals = {w: evals(w) for w in widths[:-1]}
    return Assembly(
        model, optimizer, dtype, streams, step, eval_fn, masked, masked_eval,
        width_steps, width_evals, t.seed,
    )  # fmt: skip


def _at_width(model: nn.Module, width: float, fn: Callable) -> Callable:
    """`fn` run with the model's FFNs at `width` (a compiled `fn` is traced at
    its first call, so it keeps that width)."""

    def at_width(*args):
        with matformer.use_width(model, width):
            return fn(*args)

    return at_width
