"""The training step: forward, backward, accumulation, clipping, guarded update.

`make_train_step` returns one function that does a whole optimizer step on a batch
of shape (accum, B, L+1); with `compile=True` it is wrapped in `mx.compile` with
the model, optimizer and random state declared as inputs and outputs, so calling
it only builds a lazy graph: the caller runs one `mx.eval` per step. Those state
containers are captured when the step is made: whatever restores a model or an
optimizer afterwards must write into them in place (`src.train.optim`), and
the schedule's offset to the run's step (`TrainOptimizer.follow_run_step`) is
set before the first call, which traces it as a constant.

Precision: parameters and optimizer state are fp32 (master weights); the forward
and backward run in `compute_dtype` (bf16 on GPU backends) by casting the
parameters inside the differentiated function, so gradients arrive in fp32.

Non-finite guard: if the loss or the gradient norm is NaN/inf, the update is
discarded inside the graph (parameters and optimizer state keep their old values
via `mx.where`) and the step reports ok=False.

Chat SFT (`masked=True`, `training.loss_on` resolved to assistant): the step
takes a bool mask (accum, B, L+1) beside the batch, and the loss is the mean
over the targets the mask counts across all micro-batches (each micro-batch's
summed loss is divided by the step's count, so accumulation adds them); a step
with none counted has loss 0 and zero gradients. Without a mask the step is the
plain one, unchanged.

Data-parallel (a `group` of N > 1 ranks, src/train/distributed.py): each rank
passes its own micro-batches; loss and gradients are averaged over the ranks (one
all_sum per 32 MiB of gradients, `nn.average_gradients`) before clipping, so the
clipped norm, the guard and the update are the global ones, bitwise the same on
every rank.

MatFormer (`model.matformer_widths`): a step is made for given FFN `widths`;
its loss is the mean of the losses at each (`training.matformer_loss: sum`
makes one step over all; `sample`, one step per width, `src.train.assembly`).
Each width's forward and backward run like one more micro-batch, one after
the other, so memory is one forward's and gradient checkpointing recomputes
each block at the width it ran at.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..backend import policy
from ..config import TrainingConfig
from ..model.loss import counted_targets, mean_loss, summed_loss
from ..model.matformer import use_width

# step(batch) -> (loss, grad norm, ok); a masked step also takes the mask
TrainStep = Callable[..., tuple[mx.array, mx.array, mx.array]]


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
    group: mx.distributed.Group | None = None,
    streams: list[mx.Stream] | None = None,
    masked: bool = False,
    widths: tuple[float | None, ...] = (None,),
) -> TrainStep:
    """step(batch (accum, B, L+1)) -> (mean loss, grad norm before clipping, ok);
    with `masked`, step(batch, mask (accum, B, L+1) bool) and the loss is the
    mean over the targets the mask counts (see the module docstring).

    `widths` (MatFormer FFN fractions, None: the whole model): the loss is the
    mean of the losses at each, one forward per width; a compiled step keeps the
    widths it was traced with.

    With a `group` of N ranks, the mean loss and the gradients are over all ranks'
    batches (N x accum micro-batches). `streams` split each micro-batch's rows
    (default: the policy's for `cfg.streams`)."""
    world = group.size() if group is not None else 1
    if streams is None:
        streams = policy.streams(cfg.streams, world)

    share = 1 / len(widths)  # each width's part of a micro-batch's loss

    def loss_of(params: dict, batch: mx.array, *count) -> mx.array:
        """The plain mean loss of `batch`, or with (mask, n): the summed loss of
        the targets the mask counts over n (times `share`, over several widths)."""
        if compute_dtype != mx.float32:
            params = _cast(params, compute_dtype)
        model.update(params)
        if not count:
            loss = mean_loss(model, batch, cfg.label_smoothing, streams)
        else:
            mask, n = count
            loss = summed_loss(model, batch, streams, cfg.label_smoothing, mask) / n
        return loss * share if len(widths) > 1 else loss

    loss_and_grad = mx.value_and_grad(loss_of)

    def step(batch: mx.array, mask: mx.array | None = None):
        params = model.trainable_parameters()
        accum = batch.shape[0]
        # masked: every micro-batch's sum is over the step's count, so they add up
        count = () if mask is None else (counted_targets(mask),)
        part = (lambda i: ()) if mask is None else (lambda i: (mask[i], *count))
        loss = grads = None
        # unrolled: accumulation (over micro-batches, and widths) lives in the graph
        for i, w in ((i, w) for i in range(accum) for w in widths):
            micro = batch[i]
            if grads is not None:
                # Start the next forward only once the gradients so far exist, so
                # that one forward's activations are alive at a time (else memory
                # grows with accum and the widths).
                micro = mx.depends(micro, [loss, *(g for _, g in tree_flatten(grads))])
            # forward and backward at width w (a checkpointed block recomputes in it)
            with use_width(model, w) if w is not None else contextlib.nullcontext():
                micro_loss, micro_grads = loss_and_grad(params, micro, *part(i))
            if grads is None:
                loss, grads = micro_loss, micro_grads
            else:
                loss = loss + micro_loss
                grads = tree_map(mx.add, grads, micro_grads)
        model.update(params)  # loss_of left (maybe cast) tracers in the model
        if accum > 1 and mask is None:
            loss = loss / accum
            grads = tree_map(lambda g: g / accum, grads)
        if world > 1:  # the loss rides along in the gradients' all-reduce
            mean = nn.average_gradients({"grads": grads, "loss": loss}, group)
            grads, loss = mean["grads"], mean["loss"]
        grads, grad_norm = optim.clip_grad_norm(grads, cfg.grad_clip or float("inf"))
        ok = mx.isfinite(loss) & mx.isfinite(grad_norm)

        old_opt = tree_map(lambda x: x, optimizer.state)
        optimizer.update(model, grads)
        new_params = model.trainable_parameters()
        _select_(ok, new_params, params)
        model.update(new_params)
        _select_(ok, optimizer.state, old_opt)
        return loss, grad_norm, ok

    run = step if masked else (lambda batch: step(batch))  # masked: both arrays
    if not compile:
        return run
    state = [model.state, optimizer.state, mx.random.state]
    return mx.compile(run, inputs=state, outputs=state)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The random seed for step `step`: resuming at any step redraws the same numbers
    (MLX's global key can be read but not restored, so it is reseeded each step).
    Data-parallel ranks draw different dropout masks for their micro-batches."""
    return (seed * 1_000_003 + step + rank * 2**40) % (2**63)
