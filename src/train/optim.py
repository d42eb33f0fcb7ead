"""Optimizers, behind the one interface the trainer uses.

`TrainOptimizer` is what a run needs of an optimizer besides MLX's `update` and
`state`: the learning rate of the step just taken (for the log), its state as a
flat {path: array} dict and back (for checkpoints, restored in place: the compiled
step holds the state containers), its size per parameter (for the memory
estimate), and the run's step for the learning-rate schedule
(`follow_run_step`). `OPTIMIZERS` maps `training.optimizer` to a class; a new optimizer is
a class here plus its name in `src.config.OPTIMIZERS`.

AdamW (with bias correction, like PyTorch's) applies its decoupled weight decay
only to the parameters a mask selects: matrices, not norm gains, and not the
embedding unless `training.decay_embeddings`.
"""

from __future__ import annotations

from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..config import TrainingConfig
from .schedule import lr_schedule


class TrainOptimizer:
    """The trainer's view of an optimizer (a mixin for an `mlx.optimizers` class)."""

    state_per_param: ClassVar[int]  # fp32 values of state kept per parameter
    # run step - optimizer step: the schedule follows the run (see follow_run_step)
    step_offset: int = 0

    @classmethod
    def build(cls, model: nn.Module, cfg: TrainingConfig) -> TrainOptimizer:
        """An initialized optimizer for `model` (its state exists before the first
        step, so it can be declared to mx.compile and restored from a checkpoint)."""
        raise NotImplementedError

    @property
    def current_lr(self) -> mx.array:
        """The learning rate of the last update (lazy)."""
        return self.learning_rate

    def follow_run_step(self, run_step: int) -> int:
        """Make the learning-rate schedule see the run's step `run_step` at the
        next update, whatever the optimizer's own count (which stays: Adam's bias
        correction needs it). Call it after restoring the state and before the
        compiled step first runs (its trace keeps the offset as a constant).
        Returns the offset: 0 for an ordinary resume, the checkpoint's step for
        one without optimizer state."""
        self.step_offset = run_step - int(self.step.item())
        return self.step_offset

    def schedule_step(self) -> mx.array:
        """The step the schedule is evaluated at (0-based, before the update)."""
        if not self.step_offset:  # ordinary runs: the very graph of before
            return self.step
        return self.step.astype(mx.int64) + self.step_offset

    def state_dict(self) -> dict[str, mx.array]:
        """The state as a flat {path: array} dict (what a checkpoint stores)."""
        return dict(tree_flatten(self.state))

    def load_state_dict(self, flat: dict[str, mx.array]) -> None:
        """Fill the state from `state_dict()`'s form, in place (the compiled step
        keeps a reference to the state containers). ValueError on a missing or
        extra entry."""
        expected = {k for k, _ in tree_flatten(self.state)}
        if set(flat) != expected:
            missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
            raise ValueError(
                f"optimizer state mismatch: missing {missing[:5]}, extra {extra[:5]}"
            )
        _assign_(self.state, flat)


def _assign_(tree: dict | list, flat: dict[str, mx.array], prefix: str = "") -> None:
    """In place: every array leaf of `tree` becomes flat[its tree_flatten path]."""
    keys = range(len(tree)) if isinstance(tree, list) else list(tree)
    for k in keys:
        path = f"{prefix}{k}"
        if isinstance(tree[k], (dict, list)):
            _assign_(tree[k], flat, path + ".")
        else:
            tree[k] = flat[path]


def decay_mask(model: nn.Module, decay_embeddings: bool) -> dict:
    """A tree of bools shaped like the trainable parameters: True = apply weight decay."""

    def wants_decay(path: str, p: mx.array) -> bool:
        if p.ndim < 2:
            return False
        return decay_embeddings or "embed_tokens" not in path

    return tree_map_with_path(wants_decay, model.trainable_parameters())


class AdamW(TrainOptimizer, optim.Adam):
    """Adam with decoupled weight decay on the parameters `mask` selects."""

    state_per_param = 2  # first and second moments

    def __init__(self, cfg: TrainingConfig, mask: dict):
        super().__init__(
            learning_rate=lr_schedule(cfg),
            betas=[cfg.beta1, cfg.beta2],
            eps=cfg.eps,
            bias_correction=True,
        )
        self.weight_decay = cfg.weight_decay
        self.mask = mask

    @classmethod
    def build(cls, model: nn.Module, cfg: TrainingConfig) -> AdamW:
        opt = cls(cfg, decay_mask(model, cfg.decay_embeddings))
        opt.init(model.trainable_parameters())
        return opt

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        # Same bookkeeping as optim.Optimizer.apply_gradients, plus the decay mask
        # and a schedule that follows the run's step.
        if not self._initialized:
            self.init(gradients)
        for name, scheduler in self._schedulers.items():
            self.state[name] = scheduler(self.schedule_step())
        self.state["step"] = self.step + 1
        return tree_map(self._update_one, gradients, parameters, self.state, self.mask)

    def _update_one(self, grad: mx.array, param: mx.array, state: dict, decay: bool):
        if decay and self.weight_decay:
            lr = self.learning_rate.astype(grad.dtype)
            param = param * (1 - lr * self.weight_decay)
        return super().apply_single(grad, param, state)


OPTIMIZERS: dict[str, type[TrainOptimizer]] = {"adamw": AdamW}


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> TrainOptimizer:
    """The optimizer `cfg.optimizer` names, initialized for `model`."""
    return OPTIMIZERS[cfg.optimizer].build(model, cfg)
