"""Decoder-only transformer (Llama-style) in MLX.

Pre-norm blocks: RMSNorm -> grouped-query attention with RoPE (optional QK-norm)
-> residual -> RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; LM head optionally
tied to the token embedding. No biases. Module names follow Hugging Face Llama
(`model.layers.0.self_attn.q_proj`, `model.embed_tokens`, `lm_head`, ...) so
that weight export is a dictionary lookup.

Options (each off by default, `src.config.ModelConfig`): `mlp` picks the feed-
forward (gated swiglu/geglu: down(act(gate(x)) * up(x)); plain silu/gelu/relu2:
down(act(up(x))), no gate_proj); `norm` the norm (rmsnorm, layernorm without bias,
none: identity); `norm_position` post puts the norm after each residual add,
norm(x + f(x)), with no final norm (the last block's output is normalized);
`position` none drops RoPE (causal attention alone tells positions apart).

Attention talks to a KV cache only through `cache.offset` and
`cache.update_and_fetch(k, v)`, and the model asks the first layer's cache for the
mask (`cache.make_mask(L)`): `src.inference.cache.KVCache`; mlx-lm's caches fit as
well. Masks are decided in `src.model.masks`.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..backend import kernels
from ..config import ModelConfig
from .masks import attention_mask


def _relu2(x: mx.array) -> mx.array:
    return mx.square(nn.relu(x))


# model.mlp -> its activation; GELU is the exact (erf) one, as torch's F.gelu and
# transformers' hidden_act "gelu". SiLU is the backend's (`src.backend.kernels`).
ACTIVATIONS = {
    "swiglu": kernels.silu,
    "geglu": nn.gelu,
    "silu": kernels.silu,
    "gelu": nn.gelu,
    "relu2": _relu2,
}


def make_norm(cfg: ModelConfig, dims: int) -> nn.Module:
    """The norm `cfg.norm` names over the last `dims` features (none: identity)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dims, eps=cfg.norm_eps)
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dims, eps=cfg.norm_eps, bias=False)
    return nn.Identity()


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
        if cfg.position == "rope":
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
        if "rope" in self:
            offset = cache.offset if cache is not None else 0
            q = self.rope(q, offset=offset)
            k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # GQA: kv heads are broadcast over their query-head groups.
        out = kernels.attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """Gated (swiglu, geglu): down(act(gate(x)) * up(x)); plain: down(act(up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.mlp]

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_proj" in self:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm: h = x + attn(norm1(x)), h + mlp(norm2(h)); post-norm: h =
    norm1(x + attn(x)), norm2(h + mlp(h)) (norm1, norm2 keep Llama's names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.d_model)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.post_norm = cfg.norm_position == "post"

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if self.post_norm:
            h = self.input_layernorm(x + self.dropout(self.self_attn(x, mask, cache)))
            return self.post_attention_layernorm(h + self.dropout(self.mlp(h)))
        h = x + self.dropout(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.dropout(self.mlp(self.post_attention_layernorm(h)))


class Backbone(nn.Module):
    """Embedding, blocks and final norm: HF's `LlamaModel` (the `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = [Block(cfg) for _ in range(cfg.n_layers)]
        # post-norm blocks end normalized: no final norm (nor with norm none)
        self.norm = make_norm(cfg, cfg.d_model) if cfg.final_norm else nn.Identity()
        self.dropout = nn.Dropout(cfg.dropout)
        self.checkpoint_blocks = cfg.gradient_checkpointing

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        h = self.dropout(self.embed_tokens(tokens))  # (B, L, D)
        # With a cache, the mask covers the whole cached prefix (and its padding).
        L = h.shape[1]
        mask = cache[0].make_mask(L) if cache else attention_mask(L)
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
