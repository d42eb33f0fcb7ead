"""The few operations whose best implementation depends on the backend.

On Metal and CUDA, MLX's fused kernels win: `mx.fast.scaled_dot_product_attention`,
`nn.silu`, `nn.losses.cross_entropy`. On the CPU backend the same kernels are
dominated by `exp`, which MLX evaluates there one element at a time on one core,
while `power(2, x * log2(e))` gives the same float32 result (within 1 ulp) in less
than half the time. The "portable" set below builds softmax, SiLU, cross-entropy
and attention from matmuls and that exponential; `scripts/benchmark.py` measures
the difference and `tests/test_kernels.py` checks that both sets agree, values
and gradients.

The choice is made once, from the execution policy (`src.backend.policy`: fused
on GPUs, portable on the CPU), and can be forced with SLM_KERNELS=fused|portable.
This is the only switch between backends in the model code. Masks follow
`mx.fast.scaled_dot_product_attention`: None, the string "causal", or an array
(`src.model.masks` decides which).
"""

from __future__ import annotations

import math
import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import policy

ENV_VAR = "SLM_KERNELS"
LOG2E = 1.0 / math.log(2.0)
CAUSAL_BLOCK = 128  # query rows per block of the portable causal attention
_choice: str | None = None


def kernel_set() -> str:
    """'fused' or 'portable' (decided at first use, see the module docstring)."""
    global _choice
    if _choice is None:
        _choice = default_set()
    return _choice


def default_set() -> str:
    """The set SLM_KERNELS forces, else the policy's: fused on GPUs, portable on
    the CPU backend (`src.train.autotune` may measure a better one for a run)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in ("fused", "portable"):
        return forced
    return "fused" if policy.on_gpu() else "portable"


def set_kernel_set(name: str | None) -> None:
    """Force a kernel set ('fused' / 'portable'), or None to decide again (tests)."""
    global _choice
    if name not in (None, "fused", "portable"):
        raise ValueError(f"unknown kernel set {name!r}")
    _choice = name


def exp(x: mx.array) -> mx.array:
    """e**x as 2**(x*log2 e): the fast exponential of MLX's CPU backend."""
    return mx.power(2.0, x * LOG2E)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    if kernel_set() == "fused":
        return mx.softmax(x, axis=axis, precise=True)
    e = exp(x - mx.stop_gradient(x.max(axis=axis, keepdims=True)))
    return e / e.sum(axis=axis, keepdims=True)


def silu(x: mx.array) -> mx.array:
    if kernel_set() == "fused":
        return nn.silu(x)
    return x / (1.0 + exp(-x))


def cross_entropy(
    logits: mx.array, targets: mx.array, label_smoothing: float = 0.0
) -> mx.array:
    """Per-position cross-entropy in nats; logits (..., V), integer targets (...)."""
    if kernel_set() == "fused":
        return nn.losses.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = (m + mx.log(exp(logits - m).sum(axis=-1, keepdims=True))).squeeze(-1)
    target_logit = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    if label_smoothing == 0.0:
        return lse - target_logit
    smooth = lse - logits.mean(axis=-1)  # cross-entropy against the uniform target
    return (1 - label_smoothing) * (lse - target_logit) + label_smoothing * smooth


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: Any = None,
    window: int | None = None,
) -> mx.array:
    """Softmax attention of q (B, H, L, hd) over k, v (B, KV, T, hd), H a multiple
    of KV (grouped-query). mask: None, "causal" (aligned to the end of the keys, so
    new tokens see a whole cached prefix), a bool keep-mask or an additive array.
    `window` W says the mask lets query i (of the last L keys' positions) see no
    key before i - W + 1: a hint for skipping work; the mask decides.

    Portable causal attention over more than `CAUSAL_BLOCK` queries runs block by
    block of queries, each over the keys up to its last row only (and from its
    first row's window start): the masked parts are mostly never computed, so a
    local layer costs O(L * (W + CAUSAL_BLOCK)), not O(L^2)."""
    if kernel_set() == "fused":
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    L, T = q.shape[2], k.shape[2]
    causal = isinstance(mask, str) or (mask is not None and mask.shape[-2] == L > 1)
    if causal and L > CAUSAL_BLOCK:
        outs = []
        for start in range(0, L, CAUSAL_BLOCK):
            stop = min(start + CAUSAL_BLOCK, L)
            end = T - L + stop  # one past the block's last key
            first = 0 if window is None else max(0, T - L + start - window + 1)
            qs = q[:, :, start:stop]
            part = mask if isinstance(mask, str) else mask[..., start:stop, first:end]
            ks, vs = k[:, :, first:end], v[:, :, first:end]
            outs.append(_attention(qs, ks, vs, scale, part))
        return mx.concatenate(outs, axis=2)
    return _attention(q, k, v, scale, mask)


def _attention(q, k, v, scale: float, mask: Any) -> mx.array:
    B, H, L, hd = q.shape
    KV, T = k.shape[1], k.shape[2]
    q = (q * scale).reshape(B, KV, H // KV, L, hd)  # query heads grouped by kv head
    scores = q @ k[:, :, None].swapaxes(-1, -2)  # (B, KV, H/KV, L, T)
    if isinstance(mask, str):
        rows = mx.arange(T - L, T)[:, None]
        mask = mx.arange(T)[None] <= rows
    if mask is not None:
        if mask.ndim == 4:  # (B or 1, H or 1, L, T): group the heads as q is
            mask = mask.reshape(mask.shape[0], -1, mask.shape[1] // KV or 1, L, T)
        if mask.dtype == mx.bool_:
            mask = mx.where(mask, 0.0, -math.inf)
        scores = scores + mask.astype(scores.dtype)
    out = softmax(scores.astype(mx.float32)).astype(v.dtype) @ v[:, :, None]
    return out.reshape(B, H, L, hd)
