"""Optimizer and learning-rate schedule.

AdamW (with bias correction, like PyTorch's) whose decoupled weight decay applies
only to the parameters a mask selects: matrices, not norm gains, and not the
embedding unless `training.decay_embeddings`. The schedule is a linear warm-up
followed by a cosine decay to `learning_rate * min_lr_ratio` at `max_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from .config import TrainingConfig


def lr_schedule(cfg: TrainingConfig) -> Callable[[mx.array], mx.array]:
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


def decay_mask(model: nn.Module, decay_embeddings: bool) -> dict:
    """A tree of bools shaped like the trainable parameters: True = apply weight decay."""

    def wants_decay(path: str, p: mx.array) -> bool:
        if p.ndim < 2:
            return False
        return decay_embeddings or "embed_tokens" not in path

    return tree_map_with_path(wants_decay, model.trainable_parameters())


class AdamW(optim.Adam):
    """Adam with decoupled weight decay on the parameters `mask` selects."""

    def __init__(self, cfg: TrainingConfig, mask: dict):
        super().__init__(
            learning_rate=lr_schedule(cfg),
            betas=[cfg.beta1, cfg.beta2],
            eps=cfg.eps,
            bias_correction=True,
        )
        self.weight_decay = cfg.weight_decay
        self.mask = mask

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        # Same bookkeeping as optim.Optimizer.apply_gradients, plus the decay mask.
        if not self._initialized:
            self.init(gradients)
        for name, scheduler in self._schedulers.items():
            self.state[name] = scheduler(self.step)
        self.state["step"] = self.step + 1
        return tree_map(self._update_one, gradients, parameters, self.state, self.mask)

    def _update_one(self, grad: mx.array, param: mx.array, state: dict, decay: bool):
        if decay and self.weight_decay:
            lr = self.learning_rate.astype(grad.dtype)
            param = param * (1 - lr * self.weight_decay)
        return super().apply_single(grad, param, state)


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> AdamW:
    """An initialized AdamW for `model` (state exists before the first step, so it can
    be declared to mx.compile and restored from a checkpoint)."""
    opt = AdamW(cfg, decay_mask(model, cfg.decay_embeddings))
    opt.init(model.trainable_parameters())
    return opt


def load_optimizer_state(
    opt: optim.Optimizer, flat: dict[str, mx.array], params: dict
) -> None:
    """Fill the initialized optimizer's state from a flat {path: array} dict, keeping
    its exact tree (empty subtrees included: mx.compile and the update rely on it).
    Raises ValueError on a missing or extra entry."""
    expected = {k for k, _ in tree_flatten(opt.state)}
    if set(flat) != expected:
        missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
        raise ValueError(
            f"optimizer state mismatch: missing {missing[:5]}, extra {extra[:5]}"
        )
    opt.state = tree_map_with_path(lambda path, _: flat[path], opt.state)
    opt.init(params)  # marks it initialized; existing entries are kept
