"""Model shapes, causality, parameter count, gradient checkpointing, generation."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from src.inference.generate import generate_tokens
from src.model.transformer import Model


def diff(a, b):
    d = np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32))
    return f"max {d.max():.3g} mean {d.mean():.3g}"


@pytest.mark.parametrize(
    "kw", [{}, {"qk_norm": True}, {"tie_embeddings": False}, {"n_kv_heads": None}]
)
def test_shapes_and_param_count(kw, tiny_config):
    cfg = tiny_config(**kw).model
    model = Model(cfg)
    logits = model(mx.zeros((3, 10), dtype=mx.int32))
    assert logits.shape == (3, 10, cfg.vocab_size)
    assert model.num_params() == cfg.num_params()


def test_hf_names(tiny_config):
    names = {
        k
        for k, _ in tree_flatten(
            Model(tiny_config(qk_norm=True, tie_embeddings=False).model).parameters()
        )
    }
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_norm.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ]:
        assert name in names, name


def test_causal(tiny_config):
    mx.random.seed(0)
    model = Model(tiny_config().model)
    a = mx.random.randint(0, 97, (2, 16))
    b = mx.concatenate([a[:, :10], mx.random.randint(0, 97, (2, 6))], axis=1)
    la, lb = model(a), model(b)
    assert mx.allclose(la[:, :10], lb[:, :10], atol=1e-5), diff(la[:, :10], lb[:, :10])
    assert not mx.allclose(la[:, 10:], lb[:, 10:], atol=1e-3)


def test_residual_init_is_scaled(tiny_config):
    model = Model(tiny_config(n_layers=8, init_std=0.02).model)
    layer = model.model.layers[0]
    q_std = np.std(np.array(layer.self_attn.q_proj.weight))
    o_std = np.std(np.array(layer.self_attn.o_proj.weight))
    assert abs(q_std - 0.02) < 0.004 and abs(o_std - 0.02 / 4) < 0.002, (q_std, o_std)
    assert mx.all(layer.input_layernorm.weight == 1).item()


def test_gradient_checkpointing_matches(tiny_config):
    mx.random.seed(1)
    cfg = tiny_config().model
    plain = Model(cfg)
    ckpt = Model(tiny_config(gradient_checkpointing=True).model)
    ckpt.update(plain.parameters())
    tokens = mx.random.randint(0, 97, (2, 12))

    def loss(model):
        return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()

    la, ga = nn.value_and_grad(plain, loss)(plain)
    lb, gb = nn.value_and_grad(ckpt, loss)(ckpt)
    assert abs(la.item() - lb.item()) < 1e-6
    for (k, a), (_, b) in zip(tree_flatten(ga), tree_flatten(gb)):
        assert mx.allclose(a, b, atol=1e-6), f"{k}: {diff(a, b)}"


def test_cached_generation_matches_uncached(tiny_config):
    mx.random.seed(2)
    model = Model(tiny_config(qk_norm=True).model)
    prompt = [5, 17, 3, 44, 9]
    fast = list(generate_tokens(model, prompt, 15, temperature=0.0))
    slow = list(generate_tokens(model, prompt, 15, temperature=0.0, use_cache=False))
    assert fast == slow and len(fast) == 15
    fast = list(generate_tokens(model, prompt, 15, temperature=1.0, seed=3))
    slow = list(
        generate_tokens(model, prompt, 15, temperature=1.0, seed=3, use_cache=False)
    )
    assert fast == slow


def test_generation_edge_cases(tiny_config):
    model = Model(tiny_config().model)
    assert list(generate_tokens(model, [1, 2], 0)) == []
    assert len(list(generate_tokens(model, [], 3))) == 3  # empty prompt is defined
    long_prompt = list(range(90)) * 2  # longer than the context (24)
    assert list(generate_tokens(model, long_prompt, 5)) == []  # window already full
    assert len(list(generate_tokens(model, long_prompt[:20], 50))) == 4
