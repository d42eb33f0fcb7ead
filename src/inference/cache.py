"""The KV cache of generation, and the view of it that the compiled decode step takes.

`KVCache` holds one attention layer's keys and values, (B, kv_heads, T, head_dim),
and the number of positions filled (`offset`); `make_cache` gives one per layer,
allocated once at the context length. `DecodeWindow` is the same buffers as the
compiled decode step sees them (`src.inference.generate.Decoder`): written at an
offset held in an array and attended over a fixed width. Both ask
`src.model.masks` for their masks.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..model.masks import attention_mask


class KVCache:
    """Keys and values of one attention layer, (B, kv_heads, T, head_dim).

    Storage grows in blocks of `step` positions (set `step` to the context to
    allocate once); `offset` counts the filled positions. Same interface as
    mlx-lm's KVCache (`offset`, `update_and_fetch`, `trim`, `make_mask`), without
    importing mlx-lm (whose package import pulls in transformers and torch).

    `pad` (B,) holds how many positions each row was left-padded by, so rows of
    unequal prompt lengths can share a batch: RoPE scores depend only on relative
    positions, so a padded row computes what it would alone (up to rounding)."""

    def __init__(self, step: int = 256, pad: mx.array | None = None):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.step = step
        self.pad = pad

    def make_mask(self, L: int) -> Any:
        """The mask for L new tokens over the cached ones and themselves."""
        return attention_mask(L, self.offset, pad=self.pad)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = k.shape
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            size = self.step * -(-end // self.step)  # round up to whole blocks
            keys = mx.zeros((B, H, size, D), k.dtype)
            values = mx.zeros((B, H, size, v.shape[3]), v.dtype)
            if self.keys is not None:
                keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
                values[..., : self.offset, :] = self.values[..., : self.offset, :]
            self.keys, self.values = keys, values
        self.keys[..., self.offset : end, :] = k
        self.values[..., self.offset : end, :] = v
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def trim(self, n: int) -> int:
        """Forget the last `n` positions; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n


def make_cache(model: nn.Module, pad: mx.array | None = None) -> list[KVCache]:
    """One KV cache per layer, preallocated to the context at the first prefill;
    `pad` (B,) left-padding per row (see `KVCache`)."""
    step = model.config.context_length
    return [KVCache(step, pad) for _ in model.model.layers]


class DecodeWindow:
    """One layer's cache as the compiled decode step sees it: the whole buffers,
    written at `offset` (an array, so one trace serves every position) and
    attended over their first `width` positions, the rest masked."""

    def __init__(self, keys, values, offset, width, pad):
        self.keys, self.values, self.offset = keys, values, offset
        self.width, self.pad = width, pad

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        at = self.offset.reshape(1)
        self.keys = mx.slice_update(self.keys, k, at, axes=(2,))
        self.values = mx.slice_update(self.values, v, at, axes=(2,))
        return self.keys[:, :, : self.width], self.values[:, :, : self.width]

    def make_mask(self, L: int) -> mx.array:
        return attention_mask(L, self.offset, self.width, self.pad)
