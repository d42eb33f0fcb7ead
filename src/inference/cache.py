"""The KV cache of generation, and the view of it that the compiled decode step takes.

`KVCache` holds one attention layer's keys and values, (B, kv_heads, T, head_dim),
and the number of positions filled (`offset`); `make_cache` gives one per layer,
allocated once at the context length. A local layer (`model.sliding_window` W)
gets a `RotatingKVCache` instead: W positions in a ring, position p in slot
p % W, so its memory stays W positions whatever the context. `DecodeWindow` and
`DecodeRing` are the same buffers as the compiled decode step sees them
(`src.inference.generate.Decoder`): written at an offset held in an array and
attended over a fixed width (the ring: all of it). All ask `src.model.masks` for
their masks.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..model.masks import attention_mask, ring_mask


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


class RotatingKVCache:
    """Keys and values of a local attention layer (window W): the last W
    positions, position p in slot p % W of (B, kv_heads, W, head_dim) buffers.

    Its queries never look further back than W - 1 positions, so nothing older
    is kept. Several new tokens at once (a prefill) attend over the ring's
    positions in order followed by their own; one new token (a decode step)
    over the ring as it lies (`make_mask` knows which slot holds what). `pad`
    as in `KVCache`. Trimming is possible only while nothing was overwritten."""

    def __init__(self, window: int, pad: mx.array | None = None):
        self.window, self.pad = window, pad
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self._start = 0  # position of the first key update_and_fetch returns

    def _ordered(self) -> tuple[mx.array, mx.array]:
        """The ring's filled slots, oldest position first."""
        n = min(self.offset, self.window)
        if self.offset <= self.window:
            return self.keys[..., :n, :], self.values[..., :n, :]
        cut = self.offset % self.window  # the oldest position's slot
        return mx.roll(self.keys, -cut, axis=2), mx.roll(self.values, -cut, axis=2)

    def make_mask(self, L: int) -> Any:
        pad = self.pad
        if L == 1 and self.offset >= self.window:  # the ring as it lies
            return ring_mask(mx.array(self.offset), self.window, pad)
        before = min(self.offset, self.window)  # ring positions, in order
        start = self.offset - before
        if pad is not None and start:
            pad = pad - start
        return attention_mask(L, before, before + L, pad, self.window)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = k.shape
        W = self.window
        if self.keys is None:
            self.keys = mx.zeros((B, H, W, D), k.dtype)
            self.values = mx.zeros((B, H, W, v.shape[3]), v.dtype)
        if L == 1 and self.offset >= W:  # decode over a full ring: write in place
            at = self.offset % W
            self.keys[..., at : at + 1, :] = k
            self.values[..., at : at + 1, :] = v
            self.offset += 1
            return self.keys, self.values
        old_k, old_v = self._ordered()
        keys = mx.concatenate([old_k, k], axis=2)
        values = mx.concatenate([old_v, v], axis=2)
        end = self.offset + L
        if end <= W:  # positions 0 .. end - 1 in slots 0 .. end - 1
            self.keys[..., :end, :], self.values[..., :end, :] = keys, values
        else:  # the last W positions; position end - W + i goes to its slot
            shift = (end - W) % W
            self.keys = mx.roll(keys[..., -W:, :], shift, axis=2)
            self.values = mx.roll(values[..., -W:, :], shift, axis=2)
        self.offset = end
        return keys, values

    def trim(self, n: int) -> int:
        """Forget the last `n` positions, if none was overwritten yet; returns how
        many were dropped (0 when it cannot: the caller refills the cache)."""
        if self.offset > self.window:
            return 0
        n = min(self.offset, n)
        self.offset -= n
        return n


def make_cache(model: nn.Module, pad: mx.array | None = None) -> list:
    """One KV cache per layer, preallocated to the context at the first prefill
    (a local layer: to its window); `pad` (B,) left-padding per row (see
    `KVCache`)."""
    step = model.config.context_length
    return [
        KVCache(step, pad) if w is None else RotatingKVCache(w, pad)
        for w in (layer.self_attn.window for layer in model.model.layers)
    ]


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


class DecodeRing:
    """A local layer's ring (`RotatingKVCache`) as the compiled decode step sees
    it: written at slot offset % W, attended over all W slots."""

    def __init__(self, keys, values, offset, pad):
        self.keys, self.values, self.offset, self.pad = keys, values, offset, pad

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        at = (self.offset % self.keys.shape[2]).reshape(1)
        self.keys = mx.slice_update(self.keys, k, at, axes=(2,))
        self.values = mx.slice_update(self.values, v, at, axes=(2,))
        return self.keys, self.values

    def make_mask(self, L: int) -> mx.array:
        return ring_mask(self.offset, self.keys.shape[2], self.pad)
