"""A planning estimate of a training step's peak memory, printed at start; the
docs/performance.md holds measured peaks (`scripts/memory_table.py`)."""

from __future__ import annotations

from ..config import ModelConfig


def estimate_training_memory(
    cfg: ModelConfig,
    batch_size: int,
    optimizer_state_per_param: int = 2,
    bytes_per_act: int = 4,
) -> int:
    """Rough peak bytes of one training step: fp32 weights and gradients plus the
    optimizer's fp32 state (`TrainOptimizer.state_per_param` values per parameter;
    AdamW's two moments make 16 bytes per parameter in all), saved activations of
    one micro-batch, and the logits."""
    p = cfg.num_params()
    L, d, f = cfg.context_length, cfg.d_model, cfg.ffn_dim
    kv = cfg.kv_heads * cfg.head_dim
    # saved tensors per token per block; a plain MLP saves up(x), act and its input
    per_token_layer = 8 * d + 2 * kv + (4 if cfg.gated else 3) * f
    scores = cfg.n_heads * L * L * 2 if not cfg.gradient_checkpointing else 0
    acts = batch_size * (L * per_token_layer * cfg.n_layers + scores * cfg.n_layers)
    logits = 3 * batch_size * L * cfg.vocab_size  # logits, softmax, their gradient
    return 4 * (2 + optimizer_state_per_param) * p + bytes_per_act * acts + 4 * logits
