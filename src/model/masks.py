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
    L: int, offset: Any = 0, keys: int | None = None, pad: mx.array | None = None
) -> Any:
    """Which keys each of L new queries may see: every key at or before its own
    position, and never a row's left padding (`pad` (B,): padded positions per
    row; a padding query sees itself, so its state stays finite).

    `keys` defaults to offset + L (the keys end with the queries). Returns None
    (one query that may see every key), CAUSAL (no padding, keys end with the
    queries: the kernel builds it), or a bool array (1 or B, 1, L, keys). `offset`
    may be an array (the compiled decode step): then the array form."""
    if keys is None:
        keys = offset + L
    if pad is None and isinstance(offset, int) and keys == offset + L:
        return CAUSAL if L > 1 else None
    q = offset + mx.arange(L)[:, None]
    k = mx.arange(keys)[None]
    ok = k <= q
    if pad is None:
        return ok[None, None]
    return (ok & ((k >= pad[:, None, None]) | (k == q)))[:, None]
