"""The training step: forward, backward, accumulation, clipping, guarded update.

`make_train_step` returns one function that does a whole optimizer step on a batch
of shape (accum, B, L+1); with `compile=True` it is wrapped in `mx.compile` with
the model, optimizer and random state declared as inputs and outputs, so calling
it only builds a lazy graph: the caller runs one `mx.eval` per step.

Precision: parameters and optimizer state are fp32 (master weights); the forward
and backward run in `compute_dtype` (bf16 on GPU backends) by casting the
parameters inside the differentiated function, so gradients arrive in fp32.

Non-finite guard: if the loss or the gradient norm is NaN/inf, the update is
discarded inside the graph (parameters and optimizer state keep their old values
via `mx.where`) and the step reports ok=False.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .config import TrainingConfig

PRECISIONS = {"fp32": mx.float32, "bf16": mx.bfloat16}


def resolve_precision(name: str) -> mx.Dtype:
    """`auto` = bf16 compute on GPU backends, fp32 on the CPU backend, where bf16
    matmuls have no fast kernel (~15x slower than fp32)."""
    if name == "auto":
        on_gpu = mx.default_device().type == mx.DeviceType.gpu
        return mx.bfloat16 if on_gpu else mx.float32
    return PRECISIONS[name]


def loss_fn(
    model: nn.Module, batch: mx.array, label_smoothing: float = 0.0
) -> mx.array:
    """Mean next-token cross-entropy of `batch` (B, L+1), computed in fp32."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs).astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    return losses.mean()


def _cast(tree: dict, dtype: mx.Dtype) -> dict:
    return tree_map(
        lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, tree
    )


def _select_(ok: mx.array, new: dict | list, old: dict | list) -> None:
    """In place: new[k] = where(ok, new[k], old[k]) over nested dicts/lists.

    In place because mx.compile tracks the very containers declared as state."""
    keys = range(len(new)) if isinstance(new, list) else new.keys()
    for k in keys:
        if isinstance(new[k], (dict, list)):
            _select_(ok, new[k], old[k])
        elif isinstance(new[k], mx.array):
            new[k] = mx.where(ok, new[k], old[k])


def make_train_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    cfg: TrainingConfig,
    compute_dtype: mx.Dtype = mx.float32,
    compile: bool = True,
) -> Callable[[mx.array], tuple[mx.array, mx.array, mx.array]]:
    """step(batch (accum, B, L+1)) -> (mean loss, grad norm before clipping, ok)."""

    def loss_of(params: dict, batch: mx.array) -> mx.array:
        if compute_dtype != mx.float32:
            params = _cast(params, compute_dtype)
        model.update(params)
        return loss_fn(model, batch, cfg.label_smoothing)

    loss_and_grad = mx.value_and_grad(loss_of)

    def step(batch: mx.array):
        params = model.trainable_parameters()
        accum = batch.shape[0]
        loss, grads = loss_and_grad(params, batch[0])
        for i in range(1, accum):  # unrolled: accumulation lives inside the graph
            # Start micro-batch i only once the gradients so far exist, so that one
            # micro-batch's activations are alive at a time (else memory grows with accum).
            micro = mx.depends(batch[i], [loss, *(g for _, g in tree_flatten(grads))])
            micro_loss, micro_grads = loss_and_grad(params, micro)
            loss = loss + micro_loss
            grads = tree_map(mx.add, grads, micro_grads)
        model.update(params)  # loss_of left (maybe cast) tracers in the model
        if accum > 1:
            loss = loss / accum
            grads = tree_map(lambda g: g / accum, grads)
        grads, grad_norm = optim.clip_grad_norm(grads, cfg.grad_clip or float("inf"))
        ok = mx.isfinite(loss) & mx.isfinite(grad_norm)

        old_opt = tree_map(lambda x: x, optimizer.state)
        optimizer.update(model, grads)
        new_params = model.trainable_parameters()
        _select_(ok, new_params, params)
        model.update(new_params)
        _select_(ok, optimizer.state, old_opt)
        return loss, grad_norm, ok

    if not compile:
        return step
    state = [model.state, optimizer.state, mx.random.state]
    return mx.compile(step, inputs=state, outputs=state)


def make_eval_fn(
    model: nn.Module, compile: bool = True
) -> Callable[[mx.array], mx.array]:
    """eval(batch (B, L+1)) -> summed next-token loss in nats (fp32 weights)."""

    def total_loss(batch: mx.array) -> mx.array:
        logits = model(batch[:, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="sum")

    return mx.compile(total_loss, inputs=[model.state]) if compile else total_loss


def step_seed(seed: int, step: int) -> int:
    """The random seed for step `step`: resuming at any step redraws the same numbers
    (MLX's global key can be read but not restored, so it is reseeded each step)."""
    return (seed * 1_000_003 + step) % (2**63)
