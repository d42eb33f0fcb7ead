"""A planning estimate of a training step's peak memory, printed at start; the
docs/performance.md holds measured peaks (`scripts/memory_table.py`)."""

from __future__ import annotations

from ..config import ModelConfig

CAUSAL_BLOCK = 128  # src.backend.kernels.CAUSAL_BLOCK (no MLX import here)


def estimate_training_memory(
    cfg: ModelConfig,
    batch_size: int,
    optimizer_state_per_param: float = 2,
    bytes_per_act: int = 4,
) -> int:
    """Rough peak bytes of one training step: fp32 weights and gradients plus the
    optimizer's fp32 state (`TrainOptimizer.state_per_param` values per parameter;
    AdamW's two moments make 16 bytes per parameter in all; a mean: Muon keeps
    1 value per block-matrix element, AdamW 2), saved activations of
    one micro-batch, and the logits. Mixture of experts: the weights count every
    expert (`num_params`), the activations the k experts each token visits; a
    local attention layer keeps scores over its window, not the context."""
    p = cfg.num_params()
    L, d, f = cfg.context_length, cfg.d_model, cfg.ffn_dim
    kv = cfg.kv_heads * cfg.head_dim
    # saved tensors per token per block; a plain MLP saves up(x), act and its input
    ffn = (4 if cfg.gated else 3) * f
    if cfg.moe_experts:  # k experts' tensors, the k input and output rows gathered
        # for them, and the router's logits and probabilities
        ffn = cfg.moe_top_k * (ffn + 2 * d) + 2 * cfg.moe_experts
    per_token_layer = 8 * d + 2 * kv + ffn
    # attention scores and probabilities per layer: L x L, or for a local layer
    # (sliding window W) the keys the blocked attention reads, about W + 128
    scores = 0
    if not cfg.gradient_checkpointing:
        for i in range(cfg.n_layers):
            w = cfg.layer_window(i)
            keys = L if w is None else min(L, w + CAUSAL_BLOCK)
            scores += cfg.n_heads * L * keys * 2
    acts = batch_size * (L * per_token_layer * cfg.n_layers + scores)
    logits = 3 * batch_size * L * cfg.vocab_size  # logits, softmax, their gradient
    weights = 4 * (2 + optimizer_state_per_param) * p
    return int(weights + bytes_per_act * acts + 4 * logits)
