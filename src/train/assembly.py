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
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..backend import policy
from ..config import Config
from ..eval.evaluator import LossSum, make_eval_fn
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
    optimizer = build_optimizer(model, t)
    compile = t.compile if compile is None else compile
    dtype = policy.compute_dtype(t.precision)
    world = group.size() if group is not None else 1
    streams = policy.streams(t.streams, world)
    step = make_train_step(model, optimizer, t, dtype, compile, group, streams)
    eval_fn = make_eval_fn(model, compile, streams)
    masked = make_train_step(
        model, optimizer, t, dtype, compile, group, streams, masked=True
    )
    masked_eval = make_eval_fn(model, compile, streams, masked=True)
    return Assembly(
        model, optimizer, dtype, streams, step, eval_fn, masked, masked_eval
    )
