"""Attention masks, decided in one place.

Every caller (the model without a cache, the KV cache, the compiled decode step's
window) describes its queries and keys the same way: L new queries at positions
offset, offset + 1, ...; keys at positions 0 .. keys - 1; and, for a batch of
left-padded prompts, how many positions each row was padded by. The answer takes
the forms `mx.fast.scaled_dot_product_attention` accepts (and the portable
kernels in `src.backend.kernels` too): None, "causal", or a boolean keep-mask.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

CAUSAL = "causal"  # the queries are the last L keys; the kernel builds the mask


def attention_mask(
    L: int,
    offset: Any = 0,
    keys: int | None = None,
    pad: mx.array | None = None,
    window: int | None = None,
) -> Any:
    """Which keys each of L new queries may see: every key at or before its own
    position (and, with a `window` W, after its position - W: the last W
    positions, its own included), and never a row's left padding (`pad` (B,):
    padded positions per row; a padding query sees itself, so its state stays
    finite).

    `keys` defaults to offset + L (the keys end with the queries). Returns None
    (one query that may see every key), CAUSAL (no padding, keys end with the
    queries, no window cuts: the kernel builds it), or a bool array (1 or B, 1,
    L, keys). `offset` may be an array (the compiled decode step): then the
    array form."""
    if keys is None:
        keys = offset + L
    if window is not None and isinstance(offset, int) and keys <= window:
        window = None  # every key is inside every query's window
    if pad is None and window is None and isinstance(offset, int):
        if keys == offset + L:
            return CAUSAL if L > 1 else None
    q = offset + mx.arange(L)[:, None]
    k = mx.arange(keys)[None]
    ok = k <= q
    if window is not None:
        ok = ok & (k > q - window)
    if pad is None:
        return ok[None, None]
    return (ok & ((k >= pad[:, None, None]) | (k == q)))[:, None]


def ring_mask(offset: mx.array, size: int, pad: mx.array | None = None) -> mx.array:
    """The mask of one new query at position `offset` (an array) over a ring
    buffer of `size` slots that holds position p in slot p % size (the rotating
    cache of a local layer, `size` its window): slot j holds the latest position
    congruent to j that is at most `offset`, seen if it was written (>= 0) and is
    not padding. (1 or B, 1, 1, size)."""
    slot = mx.arange(size)
    position = offset - (offset - slot) % size
    ok = position >= 0
    if pad is None:
        return ok[None, None, None]
    return (ok & ((position >= pad[:, None]) | (position == offset)))[:, None, None]
