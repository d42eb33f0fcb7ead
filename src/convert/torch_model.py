"""A PyTorch reference implementation of src/model/transformer.py, for parity
tests and export.

The same architecture with the same module names (so a `state_dict` is our MLX
weight dictionary, key for key) and the same math:
- RMSNorm: x * rsqrt(mean(x^2) + eps) computed in fp32, cast back, times the weight;
- RoPE in the convention of `mx.fast.rope(traditional=False)` (and Hugging Face's
  `rotate_half`): dimension i of a head pairs with dimension i + head_dim/2, angle
  position * theta^(-2i/head_dim);
- grouped-query attention: query head h reads kv head h // (n_heads / n_kv_heads);
- optional QK-norm (per head, before RoPE), SwiGLU MLP, no biases, and an LM head
  that is the token embedding when `tie_embeddings` (no `lm_head` key then);
- the model options: `mlp` (gated swiglu/geglu, plain silu/gelu/relu2; GELU exact,
  erf), `norm` (rmsnorm, layernorm without bias in fp32, none), `norm_position`
  (post: norm(x + f(x)), no final norm), `position` (none: no RoPE),
  `sliding_window` (a local layer's query sees the last W positions only) and
  `moe_experts` (a routed mixture of experts per FFN: softmax router in fp32,
  top-k, weights renormalised; a plain loop over the experts);
- the recipe options: `value_embeddings` (layer i with (n_layers - 1 - i) even
  adds its `value_embed(tokens)` to the values), `logit_softcap` (c * tanh(z / c)
  in fp32) and `residual_scalars` (h = a * h + b * x0 before each block, x0 the
  embedding output); `zero_init_residual` is initialisation only, nothing here.

It is written for clarity, not speed: `generate_greedy` re-runs the whole window for
every new token (no KV cache), which makes it an independent check of the cached MLX
decoder. This module imports torch and our config only; nothing on the MLX path
imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm without bias, computed in fp32 like RMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    if cfg.norm == "layernorm":
        return LayerNorm(dim, cfg.norm_eps)
    return nn.Identity()


ACTIVATIONS = {  # model.mlp -> activation
    "swiglu": F.silu,
    "geglu": F.gelu,  # exact (erf): approximate="none"
    "silu": F.silu,
    "gelu": F.gelu,
    "relu2": lambda x: F.relu(x).square(),
}


def rope_angles(
    head_dim: int, theta: float, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (L, head_dim/2) for integer `positions` (L,)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, hd) by halves: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None = None):
        super().__init__()
        self.window = window
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.n_heads,
            cfg.kv_heads,
            cfg.head_dim,
        )
        self.rope_theta = cfg.rope_theta
        self.rope = cfg.position == "rope"
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x) if ve is None else self.v_proj(x) + ve
        v = v.view(B, L, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
        if self.rope:
            cos, sin = rope_angles(
                self.head_dim, self.rope_theta, torch.arange(L, device=x.device)
            )
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA: each kv head serves n_heads / n_kv_heads consecutive query heads.
        groups = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, H, L, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        if self.window is not None:  # query i sees keys j with i - W < j <= i
            causal = causal & ~causal.tril(-self.window)
        scores = scores.masked_fill(~causal, float("-inf"))
        out = scores.float().softmax(dim=-1).to(v.dtype) @ v  # (B, H, L, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    """Gated (swiglu, geglu): down(act(gate(x)) * up(x)); plain: down(act(up(x)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.gated
        if cfg.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        self.act = ACTIVATIONS[cfg.mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Stacked(nn.Module):
    """E Linear weights in one tensor (E, out, in): expert e's is weight[e]."""

    def __init__(self, n: int, dims_in: int, dims_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, dims_out, dims_in))


class MoE(nn.Module):
    """Routed experts: probabilities = softmax(gate(x)) in fp32, each token's top
    k experts weighted by their probabilities over the k's sum; expert e is an
    MLP of the model's kind with the weights `experts.*_proj.weight[e]`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, d, f = cfg.moe_experts, cfg.d_model, cfg.ffn_dim
        self.top_k, self.gated = cfg.moe_top_k, cfg.gated
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.Module()
        if cfg.gated:
            self.experts.gate_proj = Stacked(E, d, f)
        self.experts.up_proj = Stacked(E, d, f)
        self.experts.down_proj = Stacked(E, f, d)
        self.act = ACTIVATIONS[cfg.mlp]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        h = F.linear(x, ex.up_proj.weight[e])
        if self.gated:
            h = self.act(F.linear(x, ex.gate_proj.weight[e])) * h
        else:
            h = self.act(h)
        return F.linear(h, ex.down_proj.weight[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        flat = x.reshape(-1, D)  # (N, D)
        probs = self.gate(flat).float().softmax(dim=-1)  # (N, E)
        weights, top = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in range(probs.shape[-1]):
            token, slot = torch.where(top == e)
            if len(token):
                y = self.expert(e, flat[token]) * weights[token, slot, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out.reshape(B, L, D)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.d_model)
        self.self_attn = Attention(cfg, cfg.layer_window(index))
        self.post_attention_layernorm = make_norm(cfg, cfg.d_model)
        self.mlp = MoE(cfg) if cfg.moe_experts else MLP(cfg)
        self.post_norm = cfg.norm_position == "post"
        if cfg.value_embedding(index):
            self.value_embed = nn.Embedding(cfg.vocab_size, cfg.kv_heads * cfg.head_dim)
        if cfg.residual_scalars:  # (a, b)
            self.residual_scalars = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(
        self, x: torch.Tensor, tokens: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        if hasattr(self, "residual_scalars"):  # a * x + b * x0
            x = self.residual_scalars[0] * x + self.residual_scalars[1] * x0
        ve = self.value_embed(tokens) if hasattr(self, "value_embed") else None
        if self.post_norm:  # norm(x + f(x))
            h = self.input_layernorm(x + self.self_attn(x, ve))
            return self.post_attention_layernorm(h + self.mlp(h))
        h = x + self.self_attn(self.input_layernorm(x), ve)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model) if cfg.final_norm else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = x0 = self.embed_tokens(tokens)  # (B, L, D)
        for layer in self.layers:
            h = layer(h, tokens, x0)
        return self.norm(h)


class Model(nn.Module):
    """Inference-only reference (no dropout); `forward` returns (B, L, vocab) logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.model(tokens)
        if self.config.tie_embeddings:
            logits = F.linear(h, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(h)
        if c := self.config.logit_softcap:  # in fp32
            logits = c * torch.tanh(logits.float() / c)
        return logits


def load(path) -> Model:
    """The reference model from a `python -m src.convert --to torch` file (strict)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = Model(ModelConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(next(iter(payload["state_dict"].values())).dtype).eval()


@torch.no_grad()
def generate_greedy(model: Model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt`, re-running the last `context_length` tokens
    for every new token (the slow, cache-free reference)."""
    context = model.config.context_length
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(min(max_new_tokens, context - len(tokens))):
        logits = model(torch.tensor([tokens[-context:]]))[0, -1]
        out.append(int(logits.float().argmax()))
        tokens.append(out[-1])
    return out
