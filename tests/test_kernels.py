"""The portable (CPU) kernels agree with MLX's fused ones: values and gradients."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from src.backend import kernels
from src.inference.cache import make_cache
from src.model.transformer import Model


@pytest.fixture
def kernel_sets():
    """Call fn under each set; restores the automatic choice afterwards."""

    def both(fn):
        out = {}
        for name in ("fused", "portable"):
            kernels.set_kernel_set(name)
            out[name] = fn()
            mx.eval(out[name])
        return out["fused"], out["portable"]

    yield both
    kernels.set_kernel_set(None)


def close(a, b, tol=2e-5):
    if isinstance(a, (tuple, list)):
        for x, y in zip(a, b):
            close(x, y, tol)
        return
    diff = mx.abs(a - b).max().item()
    assert diff <= tol * max(1.0, mx.abs(a).max().item()), diff


def test_exp_is_the_exponential():
    x = mx.linspace(-80, 80, 10001)
    rel = mx.abs(kernels.exp(x) / mx.exp(x) - 1).max().item()
    assert rel < 1e-6, rel
    assert kernels.exp(mx.array(-math.inf)).item() == 0.0


def test_softmax_and_silu(kernel_sets):
    x = mx.random.normal((4, 7, 33), key=mx.random.key(0)) * 5
    close(*kernel_sets(lambda: kernels.softmax(x)))
    close(*kernel_sets(lambda: mx.grad(lambda x: (kernels.softmax(x) * x).sum())(x)))
    close(*kernel_sets(lambda: kernels.silu(x)))
    close(*kernel_sets(lambda: mx.grad(lambda x: (kernels.silu(x) ** 2).sum())(x)))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(kernel_sets, smoothing):
    logits = mx.random.normal((3, 5, 50), key=mx.random.key(1)) * 4
    targets = mx.random.randint(0, 50, (3, 5), key=mx.random.key(2))

    def loss(lg):
        return kernels.cross_entropy(lg, targets, smoothing).mean()

    close(*kernel_sets(lambda: kernels.cross_entropy(logits, targets, smoothing)))
    close(*kernel_sets(lambda: mx.grad(loss)(logits)))
    # and against the definition
    kernels.set_kernel_set("portable")
    ref = -nn.log_softmax(logits)
    ref = (1 - smoothing) * mx.take_along_axis(ref, targets[..., None], -1)[
        ..., 0
    ] + smoothing * ref.mean(-1)
    close(kernels.cross_entropy(logits, targets, smoothing), ref)


@pytest.mark.parametrize(
    "L, T, mask",
    [
        (6, 6, "causal"), (3, 9, "causal"), (1, 9, None), (5, 5, "bool"),
        (5, 5, "add"), (300, 300, "causal"), (200, 230, "causal"),
    ],  # 300 and 200 queries: the portable set's causal blocks, with a remainder
)  # fmt: skip
def test_attention(kernel_sets, L, T, mask):
    B, H, KV, hd = 2, 6, 2, 8
    keys = mx.random.split(mx.random.key(3), 3)
    q = mx.random.normal((B, H, L, hd), key=keys[0])
    k = mx.random.normal((B, KV, T, hd), key=keys[1])
    v = mx.random.normal((B, KV, T, hd), key=keys[2])
    if mask == "bool":  # a random per-head keep-mask, never a fully masked row
        mask = mx.random.uniform(shape=(B, H, L, T), key=keys[0]) > 0.3
        mask = mask | mx.eye(L, T, dtype=mx.bool_)
    elif mask == "add":
        mask = mx.random.normal((B, 1, L, T), key=keys[1])

    def f(q, k, v):
        return kernels.attention(q, k, v, scale=hd**-0.5, mask=mask)

    close(*kernel_sets(lambda: f(q, k, v)))
    grads = mx.grad(lambda q, k, v: (f(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
    close(*kernel_sets(lambda: grads(q, k, v)))


def test_model_logits_and_cached_decoding_agree(kernel_sets, tiny_config):
    cfg = tiny_config(d_model=48, n_heads=6, context_length=32).model
    mx.random.seed(0)
    model = Model(cfg)
    tokens = mx.array(np.random.default_rng(0).integers(0, 97, (2, 20)))

    def cached():  # prefill 12 tokens, then 8 one at a time
        cache = make_cache(model)
        out = [model(tokens[:, :12], cache)]
        out += [model(tokens[:, i : i + 1], cache) for i in range(12, 20)]
        return mx.concatenate(out, axis=1)

    full_f, full_p = kernel_sets(lambda: model(tokens))
    close(full_f, full_p, 1e-4)
    cached_f, cached_p = kernel_sets(cached)
    close(cached_p, full_p, 1e-4)
    close(cached_f, cached_p, 1e-4)
