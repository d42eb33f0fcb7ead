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

Data-parallel (a `group` of N > 1 ranks, src/distributed.py): each rank passes its
own micro-batches; loss and gradients are averaged over the ranks (one all_sum per
32 MiB of gradients, `nn.average_gradients`) before clipping, so the clipped norm,
the guard and the update are the global ones, bitwise the same on every rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from . import blas, kernels
from .config import TrainingConfig

PRECISIONS = {"fp32": mx.float32, "bf16": mx.bfloat16}


def resolve_precision(name: str) -> mx.Dtype:
    """`auto` = bf16 compute on GPU backends, fp32 on the CPU backend, where bf16
    matmuls have no fast kernel (~15x slower than fp32)."""
    if name == "auto":
        on_gpu = mx.default_device().type == mx.DeviceType.gpu
        return mx.bfloat16 if on_gpu else mx.float32
    return PRECISIONS[name]


_STREAMS: list[mx.Stream] = []

# MLX orders a graph for evaluation breadth-first from its outputs, but at most
# MLX_BFS_MAX_WIDTH (default 20) nodes wide before it goes depth-first, and keeps
# only ~10 tasks in flight. The forward passes of the row shards on different
# streams (below) are independent chains, so the narrow order queues one shard's
# whole forward before the other's: the second stream idles through the first's
# forward (a third of the step at model_config_small). A wide order interleaves
# them (step 12.9 -> 11.3 s there; peak memory unchanged, and no change on one
# stream). MLX reads the variable once, at its first eval, so it is set when this
# module is imported; GPU backends (one stream) keep MLX's default.
BFS_WIDTH_VAR, BFS_WIDTH = "MLX_BFS_MAX_WIDTH", "100000"
if mx.default_device().type == mx.DeviceType.cpu:
    os.environ.setdefault(BFS_WIDTH_VAR, BFS_WIDTH)


def resolve_streams(n: int, world: int = 1) -> list[mx.Stream]:
    """The streams a micro-batch is split across (`training.streams`; 0 = auto).

    MLX's CPU backend runs each stream's work on its own thread, but most non-GEMM
    kernels (softmax, SiLU, norms, the cross-entropy) are single-threaded: with the
    rows of a micro-batch split over one stream per core, those run in parallel,
    and the BLAS gets one thread per stream instead of all cores per call
    (on 2 cores, 1.14x faster than one stream with a 2-thread BLAS at the shape
    of scripts/benchmark.py's model (a)).
    Auto is one stream per core left to each of `world` processes on the CPU
    backend, and one on GPUs, whose kernels already fill the device."""
    device = mx.default_device()
    if device.type == mx.DeviceType.cpu:
        cores = max(1, (os.cpu_count() or 1) // world)
        n = n or min(4, cores)
        if n > 1:
            blas.set_threads(max(1, cores // n))
    n = n or 1
    while len(_STREAMS) < n - 1:  # created once per process and reused
        _STREAMS.append(mx.new_stream(device))
    return [mx.default_stream(device), *_STREAMS[: n - 1]]


def keep_step_buffers() -> None:
    """After a training step: let MLX's allocator keep as many freed bytes for reuse
    as that step needed at its peak, so the next step of the same shapes takes its
    buffers from the cache.

    MLX's CPU allocator caches only 32 MiB by default (GPU backends cache up to
    their memory limit, which is kept when larger): every step's activations went
    back to the C allocator and were faulted in again (~1-3 s of system time per
    step at model_config_small). Never more than the step itself used is cached."""
    limit = mx.get_peak_memory()
    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)


def _shards(batch: mx.array, streams: list[mx.Stream] | None):
    """(stream, rows) pairs: equal row blocks of `batch`, one per stream (fewer when
    the batch has fewer rows than streams)."""
    streams = streams or [None]
    n = min(len(streams), batch.shape[0])
    bounds = [round(i * batch.shape[0] / n) for i in range(n + 1)]
    return [(streams[i], batch[bounds[i] : bounds[i + 1]]) for i in range(n)]


def summed_loss(
    model, batch: mx.array, streams: list[mx.Stream] | None = None, smoothing=0.0
) -> mx.array:
    """Summed next-token cross-entropy of `batch` (B, L+1) in fp32; its rows are
    split across `streams` (their backward runs on the same streams)."""
    total = mx.array(0.0)
    for stream, rows in _shards(batch, streams):
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            logits = model(rows[:, :-1]).astype(mx.float32)
            total = total + kernels.cross_entropy(logits, rows[:, 1:], smoothing).sum()
    return total


def loss_fn(
    model: nn.Module,
    batch: mx.array,
    label_smoothing: float = 0.0,
    streams: list[mx.Stream] | None = None,
) -> mx.array:
    """Mean next-token cross-entropy of `batch` (B, L+1) (see `summed_loss`)."""
    total = summed_loss(model, batch, streams, label_smoothing)
    return total / (batch.shape[0] * (batch.shape[1] - 1))


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
) -> Callable[[mx.array], tuple[mx.array, mx.array, mx.array]]:
    """step(batch (accum, B, L+1)) -> (mean loss, grad norm before clipping, ok).

    With a `group` of N ranks, the mean loss and the gradients are over all ranks'
    batches (N x accum micro-batches)."""
    world = group.size() if group is not None else 1
    streams = resolve_streams(cfg.streams, world)

    def loss_of(params: dict, batch: mx.array) -> mx.array:
        if compute_dtype != mx.float32:
            params = _cast(params, compute_dtype)
        model.update(params)
        return loss_fn(model, batch, cfg.label_smoothing, streams)

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

    if not compile:
        return step
    state = [model.state, optimizer.state, mx.random.state]
    return mx.compile(step, inputs=state, outputs=state)


def make_eval_fn(
    model: nn.Module, compile: bool = True, streams: list[mx.Stream] | None = None
) -> Callable[[mx.array], mx.array]:
    """eval(batch (B, L+1)) -> summed next-token loss in nats (fp32 weights)."""

    def total_loss(batch: mx.array) -> mx.array:
        return summed_loss(model, batch, streams)

    return mx.compile(total_loss, inputs=[model.state]) if compile else total_loss


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The random seed for step `step`: resuming at any step redraws the same numbers
    (MLX's global key can be read but not restored, so it is reseeded each step).
    Data-parallel ranks draw different dropout masks for their micro-batches."""
    return (seed * 1_000_003 + step + rank * 2**40) % (2**63)
