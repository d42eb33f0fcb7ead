"""The training objective: next-token cross-entropy of a batch of windows.

A window is context + 1 tokens: inputs w[:-1], targets w[1:]. The loss is summed
in fp32 whatever the compute dtype. A batch's rows may be split across several
streams (`src.backend.policy.streams`): each shard's forward, and so its
backward, runs on its own stream, and the sums are added.

With a mask (B, L+1) of the tokens that count (chat data: the assistant's
replies, `src.data.tokens`), only targets whose mask is set are summed: the
others are selected away (`mx.where`), so their gradient is exactly zero. The
mean is over the counted targets; a batch with none has loss 0 and zero
gradients (`masked_mean_loss`).

Mixture of experts (`model.moe_experts`): the loss adds `model.moe_aux_loss`
(training.moe_aux_loss, alpha) times the load-balancing loss, the mean over the
MoE layers of their aux (`src.model.moe`), so the mean loss is the cross-entropy
mean + alpha * aux. `summed_loss` returns sums that its callers divide by the
targets counted, so each shard adds alpha * aux * (its counted targets); with
several shards or micro-batches the aux term is their count-weighted mean.
`routed_summed_loss` keeps the two apart (what validation reports).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..backend import kernels


def _shards(batch: mx.array, streams: list[mx.Stream] | None):
    """(stream, rows) pairs: equal row blocks of `batch`, one per stream (fewer when
    the batch has fewer rows than streams)."""
    streams = streams or [None]
    n = min(len(streams), batch.shape[0])
    bounds = [round(i * batch.shape[0] / n) for i in range(n + 1)]
    return [(streams[i], batch[bounds[i] : bounds[i + 1]]) for i in range(n)]


def summed_cross_entropy(
    logits: mx.array,
    targets: mx.array,
    smoothing: float = 0.0,
    mask: mx.array | None = None,
) -> mx.array:
    """Summed cross-entropy of logits (B, L, V) against targets (B, L); with a
    bool `mask` (B, L), only where it is set."""
    losses = kernels.cross_entropy(logits, targets, smoothing)
    if mask is not None:
        losses = mx.where(mask, losses, 0.0)
    return losses.sum()


class ShardLoss(NamedTuple):
    """One shard's summed cross-entropy, its counted targets, its tokens (all go
    through the routers) and, for an MoE model, the mean aux over the MoE layers
    and their loads (layers, E); None when dense."""

    ce: mx.array
    counted: int | mx.array
    tokens: int
    aux: mx.array | None
    load: mx.array | None


def routed_summed_loss(
    model: nn.Module,
    batch: mx.array,
    streams: list[mx.Stream] | None = None,
    smoothing: float = 0.0,
    mask: mx.array | None = None,
) -> list[ShardLoss]:
    """Each shard's summed next-token cross-entropy of `batch` (B, L+1) in fp32,
    with the routing of an MoE model; its rows are split across `streams` (their
    backward runs on the same streams). With a bool `mask` (B, L+1), only the
    targets whose mask is set count."""
    out = []
    shards = _shards(batch, streams)
    masks = [m for _, m in _shards(mask, streams)] if mask is not None else None
    routed = getattr(model, "routed", None)  # ours; any other model is dense
    for i, (stream, rows) in enumerate(shards):
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            inputs = rows[:, :-1]
            logits, routings = routed(inputs) if routed else (model(inputs), [])
            counted = masks[i][:, 1:] if masks is not None else None
            ce = summed_cross_entropy(
                logits.astype(mx.float32), rows[:, 1:], smoothing, counted
            )
            n = counted.sum() if counted is not None else inputs.size
            aux = load = None
            if routings:
                aux = mx.stack([r.aux for r in routings]).mean()
                load = mx.stack([r.load for r in routings])
            out.append(ShardLoss(ce, n, inputs.size, aux, load))
    return out


def summed_loss(
    model: nn.Module,
    batch: mx.array,
    streams: list[mx.Stream] | None = None,
    smoothing: float = 0.0,
    mask: mx.array | None = None,
) -> mx.array:
    """Summed next-token cross-entropy of `batch` (B, L+1) in fp32; its rows are
    split across `streams` (their backward runs on the same streams). With a
    bool `mask` (B, L+1), only the targets whose mask is set count. An MoE model
    adds alpha * aux per counted target (alpha: `model.moe_aux_loss`)."""
    alpha = getattr(model, "moe_aux_loss", 0.0)
    total = mx.array(0.0)
    for shard in routed_summed_loss(model, batch, streams, smoothing, mask):
        total = total + shard.ce
        if shard.aux is not None and alpha:
            total = total + alpha * shard.aux * shard.counted
    return total


def counted_targets(mask: mx.array) -> mx.array:
    """The targets a mask (..., L+1) counts, at least 1 (fp32): the divisor of the
    masked mean, so a batch without any has loss 0, not NaN."""
    return mx.maximum(mask[..., 1:].sum(), 1).astype(mx.float32)


def masked_mean_loss(
    model: nn.Module,
    batch: mx.array,
    mask: mx.array,
    label_smoothing: float = 0.0,
    streams: list[mx.Stream] | None = None,
) -> mx.array:
    """Mean next-token cross-entropy of `batch` (B, L+1) over the targets `mask`
    counts (0 when it counts none)."""
    total = summed_loss(model, batch, streams, label_smoothing, mask)
    return total / counted_targets(mask)


def mean_loss(
    model: nn.Module,
    batch: mx.array,
    label_smoothing: float = 0.0,
    streams: list[mx.Stream] | None = None,
) -> mx.array:
    """Mean next-token cross-entropy of `batch` (B, L+1) (see `summed_loss`)."""
    total = summed_loss(model, batch, streams, label_smoothing)
    return total / (batch.shape[0] * (batch.shape[1] - 1))
