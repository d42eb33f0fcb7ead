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
`position` none drops RoPE (causal attention alone tells positions apart);
`sliding_window` makes the layers `ModelConfig.layer_window` names local (each
query sees the last W positions), the others global; `moe_experts` makes each
FFN a routed mixture of experts (`src.model.moe`).

The 2025-26 small-model recipe (modded-nanogpt, nanochat), also off by default:
`value_embeddings` gives the last layer and every second one before it its own
token table `value_embed` (vocab x kv_heads*head_dim) added to the attention's
values, v = v + ve(tokens) (before the KV cache, so cached values include it);
`zero_init_residual` starts every residual output projection (o_proj, down_proj,
the experts' down_proj) at exactly zero, so each block starts as the identity;
`logit_softcap` c > 0 makes the logits c * tanh(logits / c), in fp32 (Gemma 2);
`residual_scalars` mixes the embedding output x0 back in before each block i,
h = a_i * h + b_i * x0, with a learned (2,) `residual_scalars` = (a_i, b_i)
starting at (1, 0).

`model(tokens)` returns logits; `model.routed(tokens)` returns (logits, one
`Routing` per MoE layer: its load-balancing loss and expert load), which the
training loss and the validation read (`src.model.loss`). `moe_aux_loss`, a
Python float (`training.moe_aux_loss`, set by whoever builds the run), weighs
that loss in the training objective.

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
from .moe import MoE, Routing


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
    """Grouped-query attention; `window` (None: global) limits each query to the
    last `window` positions, its own included (`model.sliding_window`)."""

    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        self.window = window
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

    def __call__(
        self,
        x: mx.array,
        mask: Any = None,
        cache: Any = None,
        ve: mx.array | None = None,
    ) -> mx.array:
        """`ve` (B, L, kv_heads*head_dim), if given, is added to the values."""
        B, L, _ = x.shape
        # (B, L, H*hd) -> (B, L, H, hd); QK-norm acts per head before RoPE
        q = self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x)
        if ve is not None:  # model.value_embeddings
            v = v + ve
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim)
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
        out = kernels.attention(q, k, v, self.scale, mask, self.window)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """Gated (swiglu, geglu): down(act(gate(x)) * up(x)); plain: down(act(up(x))).

    `width` (a Python int, None: all) uses only the first `width` neurons: the
    nested sub-FFN of MatFormer (`src.model.matformer` sets it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.mlp]
        self.width: int | None = None

    def __call__(self, x: mx.array) -> mx.array:
        if self.width is not None:
            return self._narrow(x, self.width)
        if "gate_proj" in self:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))

    def _narrow(self, x: mx.array, n: int) -> mx.array:
        """The same FFN over its first n neurons only."""
        h = x @ self.up_proj.weight[:n].T
        if "gate_proj" in self:
            h = self.act(x @ self.gate_proj.weight[:n].T) * h
        else:
            h = self.act(h)
        return h @ self.down_proj.weight[:, :n].T


class Block(nn.Module):
    """Pre-norm: h = x + attn(norm1(x)), h + mlp(norm2(h)); post-norm: h =
    norm1(x + attn(x)), norm2(h + mlp(h)) (norm1, norm2 keep Llama's names).
    With residual scalars x is first a * x + b * x0; with a value embedding the
    attention's values get value_embed(tokens) added."""

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.d_model)
        self.self_attn = Attention(cfg, cfg.layer_window(index))
        self.post_attention_layernorm = make_norm(cfg, cfg.d_model)
        act = ACTIVATIONS[cfg.mlp]
        self.mlp = MoE(cfg, act) if cfg.moe_experts else MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.post_norm = cfg.norm_position == "post"
        if cfg.value_embedding(index):
            self.value_embed = nn.Embedding(cfg.vocab_size, cfg.kv_heads * cfg.head_dim)
        if cfg.residual_scalars:
            self.residual_scalars = mx.array([1.0, 0.0])  # (a, b): a * h + b * x0

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        return self.routed(x, mask, cache)[0]

    def routed(
        self,
        x: mx.array,
        mask: Any = None,
        cache: Any = None,
        tokens: mx.array | None = None,
        x0: mx.array | None = None,
    ) -> tuple[mx.array, Routing | None]:
        """(the block's output, its MoE routing; None for a dense FFN). `tokens`
        (B, L) feed a value embedding, `x0` (B, L, D) the residual scalars."""
        if "residual_scalars" in self:
            a, b = self.residual_scalars[0], self.residual_scalars[1]
            x = a * x + b * x0
        ve = self.value_embed(tokens) if "value_embed" in self else None
        if self.post_norm:
            attn = self.self_attn(x, mask, cache, ve)
            h = self.input_layernorm(x + self.dropout(attn))
            y, routing = self._ffn(h)
            return self.post_attention_layernorm(h + self.dropout(y)), routing
        h = x + self.dropout(self.self_attn(self.input_layernorm(x), mask, cache, ve))
        y, routing = self._ffn(self.post_attention_layernorm(h))
        return h + self.dropout(y), routing

    def _ffn(self, x: mx.array) -> tuple[mx.array, Routing | None]:
        if isinstance(self.mlp, MoE):
            return self.mlp.routed(x)
        return self.mlp(x), None


class Backbone(nn.Module):
    """Embedding, blocks and final norm: HF's `LlamaModel` (the `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = [Block(cfg, i) for i in range(cfg.n_layers)]
        # post-norm blocks end normalized: no final norm (nor with norm none)
        self.norm = make_norm(cfg, cfg.d_model) if cfg.final_norm else nn.Identity()
        self.dropout = nn.Dropout(cfg.dropout)
        self.checkpoint_blocks = cfg.gradient_checkpointing
        self.keeps_x0 = cfg.residual_scalars  # x0 for the blocks' residual scalars

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        return self.routed(tokens, cache)[0]

    def routed(
        self, tokens: mx.array, cache: list | None = None
    ) -> tuple[mx.array, list[Routing]]:
        """(final hidden states (B, L, D), the MoE layers' routings in order)."""
        h = self.dropout(self.embed_tokens(tokens))  # (B, L, D)
        x0 = h if self.keeps_x0 else None
        routings = []
        # With a cache, the mask covers the whole cached prefix (and its padding);
        # one mask per attention window, from the first cache of that window.
        L = h.shape[1]
        cache = cache or [None] * len(self.layers)
        masks: dict = {}
        for layer, layer_cache in zip(self.layers, cache):
            window = layer.self_attn.window
            if window not in masks:
                masks[window] = (
                    layer_cache.make_mask(L)
                    if layer_cache is not None
                    else attention_mask(L, window=window)
                )
            mask = masks[window]
            if self.checkpoint_blocks and self.training:
                h, routing = _checkpointed(layer, h, mask, tokens, x0)
            else:
                h, routing = layer.routed(h, mask, layer_cache, tokens, x0)
            if routing is not None:
                routings.append(routing)
        return self.norm(h), routings


def _checkpointed(
    layer: Block, h: mx.array, mask: Any, tokens: mx.array, x0: mx.array | None
) -> tuple[mx.array, Routing | None]:
    """Run a block without keeping its activations; they are recomputed in backward.
    x0 is an input (not captured): the checkpoint returns gradients for inputs only."""

    def inner(params, h, *x0):
        layer.update(params)
        out, routing = layer.routed(h, mask, None, tokens, *x0)
        return (out,) if routing is None else (out, *routing)

    extra = () if x0 is None else (x0,)
    out, *routing = mx.checkpoint(inner)(layer.trainable_parameters(), h, *extra)
    return out, Routing(*routing) if routing else None


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights(cfg)
        # weight of the MoE load-balancing loss in the training loss (a Python
        # float, not a parameter); the run sets it from training.moe_aux_loss
        self.moe_aux_loss = 0.0

    def __call__(self, tokens: mx.array, cache: list | None = None) -> mx.array:
        """Logits (B, L, vocab) for tokens (B, L); `cache` is one KV cache per layer."""
        return self.routed(tokens, cache)[0]

    def routed(
        self, tokens: mx.array, cache: list | None = None
    ) -> tuple[mx.array, list[Routing]]:
        """(logits (B, L, vocab), one Routing per MoE layer; [] when dense)."""
        h, routings = self.model.routed(tokens, cache)
        if self.config.tie_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        if c := self.config.logit_softcap:  # fp32 whatever the compute dtype
            logits = c * mx.tanh(logits.astype(mx.float32) / c)
        return logits, routings

    def _init_weights(self, cfg: ModelConfig) -> None:
        # N(0, std) everywhere; residual output projections scaled by 1/sqrt(2*layers)
        # so the residual stream's variance does not grow with depth (GPT-2), or
        # zero (zero_init_residual; drawn all the same, so the other weights are the
        # default model's). Gains (norms, residual scalars) keep their values.
        std = cfg.init_std
        resid_std = std / math.sqrt(2 * cfg.n_layers)
        init = nn.init.normal(0.0, std)
        init_resid = nn.init.normal(0.0, resid_std)

        def pick(path: str, p: mx.array) -> mx.array:
            if p.ndim < 2:  # norm weights stay at 1
                return p
            if path.endswith(("o_proj.weight", "down_proj.weight")):
                w = init_resid(p)
                return mx.zeros_like(w) if cfg.zero_init_residual else w
            return init(p)

        flat = tree_flatten(self.parameters())
        self.update(tree_unflatten([(k, pick(k, v)) for k, v in flat]))

    def num_params(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))
