"""Optimizers, behind the one interface the trainer uses.

`TrainOptimizer` is what a run needs of an optimizer besides MLX's `update` and
`state`: the learning rate of the step just taken (for the log), its state as a
flat {path: array} dict and back (for checkpoints, restored in place: the compiled
step holds the state containers), its size per parameter (for the memory
estimate), a log line saying what it is (`describe`), and the run's step for the
learning-rate schedule (`follow_run_step`). `OPTIMIZERS` maps `training.optimizer`
to a class; a new optimizer is a class here plus its name in `src.config.OPTIMIZERS`.

AdamW (with bias correction, like PyTorch's) applies its decoupled weight decay
only to the parameters a mask selects: matrices, not norm gains, and not the
embedding unless `training.decay_embeddings`.

Muon (`training.optimizer: muon`, Keller Jordan's "MomentUm Orthogonalized by
Newton-Schulz") updates the matrices inside the transformer blocks (attention
q/k/v/o, the MLP's, a stacked (E, out, in) expert weight as E matrices) and
leaves the rest, the embedding, the LM head and every gain, to the AdamW above
(same decay mask). Per matrix W (m x n) with gradient G:
    M <- mu M + (1 - mu) G                      (momentum, one buffer per element)
    U <- NS5(mu M + (1 - mu) G)                 (Nesterov; NS5 below)
    W <- W (1 - lr wd) - lr max(1, m / n)^0.5 U  (decoupled decay, as AdamW's)
with lr = `muon_learning_rate` on the run's schedule (the same warm-up and
decay shape as AdamW's, scaled to its own peak), mu = `muon_momentum`, wd =
`muon_weight_decay`. NS5 is five steps of the quintic Newton-Schulz iteration
on G / |G|_F, in fp32 whatever the gradient's dtype: it maps the singular values
into about [0.7, 1.2] (not exactly 1: the coefficients trade accuracy for speed)
and keeps the singular vectors, an approximate U V^T. Cost per m x n matrix
(m <= n): 5 (4 m^2 n + 2 m^3) FLOPs, what a forward and backward pass of 3.3 m
(m = n: 5 m) tokens through it costs, per optimizer step: with a batch of 2,048
tokens and m = 256 that is 50-60% more than the matrix's training FLOPs. The
matrices' updates run on the streams in `TrainOptimizer.streams` (default: the
default stream only; the CPU's streams have one core each), balanced by those
FLOPs, and on each stream the matrices of one shape (tall ones transposed) are
stacked into one batched iteration: the same products in a few large operations
instead of many small ones (at the speedrun shape, 28 matrices become 3-6
batches; the step's Muon overhead over AdamW fell from 1.28x to 1.18x in one
benchmark run under load). MLX's own `optim.Muon` is not used: it adds the weight decay to the
gradient (coupled L2) and iterates in the gradient's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..config import TrainingConfig
from .schedule import lr_schedule


class TrainOptimizer:
    """The trainer's view of an optimizer (a mixin for an `mlx.optimizers` class)."""

    # fp32 values of state kept per parameter (a mean where parameters differ)
    state_per_param: float
    # run step - optimizer step: the schedule follows the run (see follow_run_step)
    step_offset: int = 0
    # the streams an optimizer may spread its own work over (the run's; set
    # before the compiled step is first traced; empty: the default stream)
    streams: Sequence[mx.Stream] = ()

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

    def describe(self) -> str:
        """One log line: the optimizer and its settings."""
        return f"optimizer: {type(self).__name__}"

    def state_values(self) -> int:
        """The values of state kept for the parameters (the scalars, step and
        learning rates, not counted): `state_per_param` x parameters."""
        return sum(a.size for k, a in tree_flatten(self.state) if "." in k)

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
                f"optimizer state mismatch: missing {missing[:5]}, extra {extra[:5]} "
                f"(this run's optimizer is {type(self).__name__}; was it saved "
                "with another training.optimizer?)"
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
        return decay_embeddings or "embed" not in path  # value_embed too

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
        self.cfg = cfg

    @classmethod
    def build(cls, model: nn.Module, cfg: TrainingConfig) -> AdamW:
        opt = cls(cfg, decay_mask(model, cfg.decay_embeddings))
        opt.init(model.trainable_parameters())
        return opt

    def describe(self) -> str:
        return f"optimizer: AdamW ({self._adamw_settings()})"

    def _adamw_settings(self) -> str:
        c = self.cfg
        where = "matrices and the embedding" if c.decay_embeddings else "matrices"
        return (
            f"peak lr {c.learning_rate:g}, betas {c.beta1:g}/{c.beta2:g}, "
            f"weight decay {c.weight_decay:g} on the {where}"
        )

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        # Same bookkeeping as optim.Optimizer.apply_gradients, plus the decay mask
        # and a schedule that follows the run's step.
        if not self._initialized:
            self.init(gradients)
        for name, scheduler in self._schedulers.items():
            self.state[name] = scheduler(self.schedule_step())
        self.state["step"] = self.step + 1
        return self._apply_all(gradients, parameters)

    def _apply_all(self, gradients: dict, parameters: dict) -> dict:
        return tree_map(self._update_one, gradients, parameters, self.state, self.mask)

    def _update_one(self, grad: mx.array, param: mx.array, state: dict, decay: bool):
        if decay and self.weight_decay:
            lr = self.learning_rate.astype(grad.dtype)
            param = param * (1 - lr * self.weight_decay)
        return super().apply_single(grad, param, state)


# Keller Jordan's quintic: its slope at 0 (a) is large, so five steps lift even
# small singular values; the price is a band around 1 instead of exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def newton_schulz(g: mx.array, steps: int = NS_STEPS) -> mx.array:
    """An approximate orthogonal polar factor U V^T of every matrix in `g` (the
    last two axes; leading axes are a batch), in fp32 whatever g's dtype: the
    singular vectors kept, the singular values moved into about [0.7, 1.2]."""
    x = g.astype(mx.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.swapaxes(-1, -2)
    x = x / (mx.linalg.norm(x, axis=(-2, -1), keepdims=True) + 1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.swapaxes(-1, -2)
        poly = mx.addmm(b * gram, gram, gram, alpha=c)  # b A + c A^2
        x = mx.addmm(a * x, poly, x)  # a X + (b A + c A^2) X
    return x.swapaxes(-1, -2) if tall else x


def ns_flops(shape: tuple[int, ...], steps: int = NS_STEPS) -> int:
    """FLOPs of `newton_schulz` on an array of `shape`."""
    *batch, m, n = shape
    m, n = min(m, n), max(m, n)
    return math.prod(batch) * steps * (4 * m * m * n + 2 * m**3)


def muon_mask(model: nn.Module) -> dict:
    """A tree of bools shaped like the trainable parameters: True = Muon (the
    matrices inside the transformer blocks, stacked ones included), False =
    AdamW (the embedding, the LM head, every gain and bias)."""

    def is_block_matrix(path: str, p: mx.array) -> bool:
        return path.startswith("model.layers.") and p.ndim >= 2 and "embed" not in path

    return tree_map_with_path(is_block_matrix, model.trainable_parameters())


class Muon(AdamW):
    """Muon for the matrices `route` selects, the AdamW above for the rest (see
    the module docstring); one step count and one schedule shape for both."""

    def __init__(self, cfg: TrainingConfig, mask: dict, route: dict):
        super().__init__(cfg, mask)
        peak = dataclasses.replace(cfg, learning_rate=cfg.muon_learning_rate)
        self._maybe_schedule("muon_learning_rate", lr_schedule(peak))
        self.momentum = cfg.muon_momentum
        self.muon_weight_decay = cfg.muon_weight_decay
        self.route = route

    @classmethod
    def build(cls, model: nn.Module, cfg: TrainingConfig) -> Muon:
        params = model.trainable_parameters()
        opt = cls(cfg, decay_mask(model, cfg.decay_embeddings), muon_mask(model))
        opt.init(params)
        return opt

    def describe(self) -> str:
        c = self.cfg
        return (
            f"optimizer: Muon on the {self.muon_matrices} block matrices, "
            f"{self.muon_share:.0%} of the parameters (peak lr "
            f"{c.muon_learning_rate:g}, momentum {c.muon_momentum:g}, weight decay "
            f"{c.muon_weight_decay:g}); AdamW on the rest ({self._adamw_settings()})"
        )

    @property
    def muon_lr(self) -> mx.array:
        """Muon's learning rate of the last update (lazy)."""
        return self.state["muon_learning_rate"]

    def init(self, parameters: dict) -> None:
        super().init(parameters)  # Adam's two moments everywhere, then for
        tree_map(self._init_muon, parameters, self.state, self.route)  # Muon's: one
        route = dict(tree_flatten(self.route))
        sizes = {k: p.size for k, p in tree_flatten(parameters)}
        self.muon_share = sum(n for k, n in sizes.items() if route[k]) / sum(sizes.values())  # fmt: skip
        self.muon_matrices = sum(
            math.prod(p.shape[:-2]) for k, p in tree_flatten(parameters) if route[k]
        )
        self.state_per_param = 2 - self.muon_share  # Muon keeps 1 value, AdamW 2

    @staticmethod
    def _init_muon(param: mx.array, state: dict, muon: bool) -> None:
        if muon and "momentum" not in state:
            state.clear()
            state["momentum"] = mx.zeros_like(param)

    def _apply_all(self, gradients: dict, parameters: dict) -> dict:
        updates = self._muon_updates(gradients, parameters)

        def one(path, grad, param, state, decay, muon):
            if not muon:
                return self._update_one(grad, param, state, decay)
            lr = self.muon_lr
            if self.muon_weight_decay:
                param = param * (1 - lr * self.muon_weight_decay)
            rows, cols = param.shape[-2:]
            scale = max(1.0, rows / cols) ** 0.5  # Keller Jordan's (and MLX's) rule
            return param - (lr * scale * updates[path]).astype(param.dtype)

        return tree_map_with_path(
            one, gradients, parameters, self.state, self.mask, self.route
        )

    def _muon_updates(self, gradients: dict, parameters: dict) -> dict[str, mx.array]:
        """{path: NS5(Nesterov momentum)} of every Muon matrix, the momentum
        buffers advanced. Matrices of one shape (a wide m x n and a tall n x m
        are one shape: the tall ones are transposed) are stacked and iterated as
        one batch: the same products, a fraction of the operations to schedule.
        The batches run on the streams of `_spread`."""
        grads, states = dict(tree_flatten(gradients)), dict(tree_flatten(self.state))
        mu, updates = self.momentum, {}
        for stream, paths in self._spread(grads):
            with mx.stream(stream):
                stack = []
                for path in paths:
                    g = grads[path].astype(mx.float32)
                    m = mu * states[f"{path}.momentum"] + (1 - mu) * g
                    _set_path(self.state, f"{path}.momentum", m)
                    stack.append(_wide(mu * m + (1 - mu) * g))
                u, start = newton_schulz(mx.concatenate(stack)), 0
                for path, x in zip(paths, stack):
                    part, start = u[start : start + x.shape[0]], start + x.shape[0]
                    if grads[path].shape[-2] > grads[path].shape[-1]:  # tall
                        part = part.swapaxes(-1, -2)
                    updates[path] = part.reshape(grads[path].shape)
        return updates

    def _spread(self, arrays: dict) -> list[tuple[mx.Stream, list[str]]]:
        """[(stream, paths of one batch)]: the Muon matrices among `arrays`
        ({path: array}, e.g. the gradients) balanced over `streams` by FLOPs
        (largest first, each to the least loaded stream), then on each stream
        in batches of one (wide) shape."""
        streams = list(self.streams) or [mx.default_stream(mx.default_device())]
        route = dict(tree_flatten(self.route))
        paths = [k for k in arrays if route.get(k)]
        load, batches = [0] * len(streams), [{} for _ in streams]
        for k in sorted(paths, key=lambda k: -ns_flops(arrays[k].shape)):
            i = load.index(min(load))
            load[i] += ns_flops(arrays[k].shape)
            batches[i].setdefault(tuple(sorted(arrays[k].shape[-2:])), []).append(k)
        return [(s, group) for s, b in zip(streams, batches) for group in b.values()]


def _wide(x: mx.array) -> mx.array:
    """x as a batch (N, m, n) of wide matrices (m <= n): tall ones transposed."""
    x = x.swapaxes(-1, -2) if x.shape[-2] > x.shape[-1] else x
    return x.reshape(-1, *x.shape[-2:])


def _set_path(tree: dict | list, path: str, value: mx.array) -> None:
    """tree[a][b]... = value for the tree_flatten path "a.b..."."""
    *parents, leaf = path.split(".")
    for key in parents:
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    tree[int(leaf) if isinstance(tree, list) else leaf] = value


OPTIMIZERS: dict[str, type[TrainOptimizer]] = {"adamw": AdamW, "muon": Muon}


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> TrainOptimizer:
    """The optimizer `cfg.optimizer` names, initialized for `model`."""
    return OPTIMIZERS[cfg.optimizer].build(model, cfg)
