"""The training objective: next-token cross-entropy of a batch of windows.

A window is context + 1 tokens: inputs w[:-1], targets w[1:]. The loss is summed
in fp32 whatever the compute dtype. A batch's rows may be split across several
streams (`src.backend.policy.streams`): each shard's forward, and so its
backward, runs on its own stream, and the sums are added.
"""

from __future__ import annotations

import contextlib

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


def summed_loss(
    model: nn.Module,
    batch: mx.array,
    streams: list[mx.Stream] | None = None,
    smoothing: float = 0.0,
) -> mx.array:
    """Summed next-token cross-entropy of `batch` (B, L+1) in fp32; its rows are
    split across `streams` (their backward runs on the same streams)."""
    total = mx.array(0.0)
    for stream, rows in _shards(batch, streams):
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            logits = model(rows[:, :-1]).astype(mx.float32)
            total = total + kernels.cross_entropy(logits, rows[:, 1:], smoothing).sum()
    return total


def mean_loss(
    model: nn.Module,
    batch: mx.array,
    label_smoothing: float = 0.0,
    streams: list[mx.Stream] | None = None,
) -> mx.array:
    """Mean next-token cross-entropy of `batch` (B, L+1) (see `summed_loss`)."""
    total = summed_loss(model, batch, streams, label_smoothing)
    return total / (batch.shape[0] * (batch.shape[1] - 1))
