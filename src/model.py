"""Decoder-only transformer (Llama-style) in MLX.

Pre-norm blocks: RMSNorm -> grouped-query attention with RoPE (optional QK-norm)
-> residual -> RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; LM head optionally
tied to the token embedding. No biases. Module names follow Hugging Face Llama
(`model.layers.0.self_attn.q_proj`, `model.embed_tokens`, `lm_head`, ...) so
that weight export is a dictionary lookup.

Attention talks to a KV cache only through `cache.offset` and
`cache.update_and_fetch(k, v)` (`KVCache` below; mlx-lm's caches fit as well).
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import kernels
from .config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.n_heads,
            cfg.kv_heads,
            cfg.head_dim,
        )
        self.scale = self.head_dim**-0.5
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=cfg.norm_eps)
        # traditional=False rotates the two halves of each head (the HF convention).
        self.rope = nn.RoPE(hd, traditional=False, base=cfg.rope_theta)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        # (B, L, H*hd) -> (B, L, H, hd); QK-norm acts per head before RoPE
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, hd)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # GQA: kv heads are broadcast over their query-head groups.
        out = kernels.attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(kernels.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.dropout(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.dropout(self.mlp(self.post_attention_layernorm(h)))


class Backbone(nn.Module):
    """Embedding, blocks and final norm: HF's `LlamaModel` (the `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = [Block(cfg) for _ in range(cfg.n_layers)]
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.checkpoint_blocks = cfg.gradient_checkpointing

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        h = self.dropout(self.embed_tokens(tokens))  # (B, L, D)
        # "causal" lets the fused kernel build the mask; with a cache it is aligned to
        # the end, so a chunk of new tokens sees the whole cached prefix. A cache
        # with padded rows (or the compiled decode step's window) makes its own.
        L = h.shape[1]
        mask = cache[0].make_mask(L) if cache else ("causal" if L > 1 else None)
        cache = cache or [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, cache):
            if self.checkpoint_blocks and self.training:
                h = _checkpointed(layer, h, mask)
            else:
                h = layer(h, mask, layer_cache)
        return self.norm(h)


def _checkpointed(layer: Block, h: mx.array, mask: Any) -> mx.array:
    """Run a block without keeping its activations; they are recomputed in backward."""

    def inner(params, h):
        layer.update(params)
        return layer(h, mask)

    return mx.checkpoint(inner)(layer.trainable_parameters(), h)


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights(cfg)

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        """Logits (B, L, vocab) for tokens (B, L); `cache` is one KV cache per layer."""
        h = self.model(tokens, cache)
        if self.config.tie_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def _init_weights(self, cfg: ModelConfig) -> None:
        # N(0, std) everywhere; residual output projections scaled by 1/sqrt(2*layers)
        # so the residual stream's variance does not grow with depth (GPT-2).
        std = cfg.init_std
        resid_std = std / math.sqrt(2 * cfg.n_layers)
        init = nn.init.normal(0.0, std)
        init_resid = nn.init.normal(0.0, resid_std)

        def pick(path: str, p: mx.array) -> mx.array:
            if p.ndim < 2:  # norm weights stay at 1
                return p
            if path.endswith(("o_proj.weight", "down_proj.weight")):
                return init_resid(p)
            return init(p)

        flat = tree_flatten(self.parameters())
        self.update(tree_unflatten([(k, pick(k, v)) for k, v in flat]))

    def num_params(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))

    def make_cache(self, step: int = 256, pad: mx.array | None = None) -> list[KVCache]:
        """A fresh KV cache per layer, growing in blocks of `step` positions; `pad`
        as in `KVCache`."""
        return [KVCache(step, pad) for _ in self.model.layers]


def attention_mask(pad: mx.array | None, offset: Any, L: int, T: int) -> mx.array:
    """Which of T key positions each of L new queries (at offset, offset+1, ...)
    may see: causal, and, for rows left-padded by `pad` (B,) positions, never the
    padding (a padding query sees itself, so its state stays finite). Bool,
    (1 or B, 1, L, T). `offset` may be an array (the compiled decode step)."""
    q = offset + mx.arange(L)[:, None]
    k = mx.arange(T)[None]
    ok = k <= q
    if pad is None:
        return ok[None, None]
    return (ok & ((k >= pad[:, None, None]) | (k == q)))[:, None]


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
        """The mask for L new tokens: "causal"/None unless rows are padded."""
        if self.pad is None:
            return "causal" if L > 1 else None
        return attention_mask(self.pad, self.offset, L, self.offset + L)

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


def estimate_training_memory(
    cfg: ModelConfig, batch_size: int, bytes_per_act: int = 4
) -> int:
    """Rough peak bytes of one training step: fp32 weights, grads and two Adam moments
    (16 bytes/param) plus saved activations and logits. An estimate for planning;
    the README's table gives measured peaks."""
    p = cfg.num_params()
    L, d, f = cfg.context_length, cfg.d_model, cfg.ffn_dim
    kv = cfg.kv_heads * cfg.head_dim
    per_token_layer = 8 * d + 2 * kv + 4 * f  # saved tensors per token per block
    scores = cfg.n_heads * L * L * 2 if not cfg.gradient_checkpointing else 0
    acts = batch_size * (L * per_token_layer * cfg.n_layers + scores * cfg.n_layers)
    logits = 3 * batch_size * L * cfg.vocab_size  # logits, softmax, their gradient
    return 16 * p + bytes_per_act * acts + 4 * logits
