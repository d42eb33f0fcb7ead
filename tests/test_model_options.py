"""The model options (model.mlp, norm, norm_position, position): each one's shapes,
parameter count, causality, compiled-vs-eager training step and a real training
run; the default model unchanged, bit for bit; the config rules between them.
Parity with the PyTorch reference and transformers is in tests/test_convert.py,
cached generation in tests/test_generate.py."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from src.backend import kernels
from src.checkpoint.contents import load_model
from src.config import ModelConfig
from src.errors import ConfigError
from src.inference.generate import generate_tokens
from src.model.masks import attention_mask
from src.model.transformer import Model
from src.train.memory import estimate_training_memory
from src.train.optim import build_optimizer
from src.train.step import make_train_step

# One entry per option value off the default, plus combinations.
OPTIONS = {
    "geglu": {"mlp": "geglu"},
    "silu": {"mlp": "silu"},
    "gelu": {"mlp": "gelu"},
    "relu2": {"mlp": "relu2"},
    "layernorm": {"norm": "layernorm"},
    "no-norm": {"norm": "none"},
    "no-norm+qk": {"norm": "none", "qk_norm": True},
    "post": {"norm_position": "post"},
    "post-layernorm": {"norm": "layernorm", "norm_position": "post"},
    "nope": {"position": "none"},
    "local-global": {"sliding_window": 4, "global_every": 2},
    "all": {
        "mlp": "relu2",
        "norm": "layernorm",
        "norm_position": "post",
        "position": "none",
        "qk_norm": True,
    },  # fmt: skip
}


def diff(a, b) -> str:
    d = np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32))
    return f"max {d.max():.3g} mean {d.mean():.3g}"


def names(model) -> dict[str, tuple]:
    return {k: v.shape for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_shapes_params_and_causality(opts, tiny_config):
    cfg = tiny_config(**opts).model
    mx.random.seed(0)
    model = Model(cfg)
    a = mx.random.randint(0, 97, (2, 16))
    b = mx.concatenate([a[:, :10], mx.random.randint(0, 97, (2, 6))], axis=1)
    la, lb = model(a), model(b)
    assert la.shape == (2, 16, cfg.vocab_size)
    assert mx.allclose(la[:, :10], lb[:, :10], atol=1e-5), diff(la[:, :10], lb[:, :10])
    assert not mx.allclose(la[:, 10:], lb[:, 10:], atol=1e-3)
    assert model.num_params() == cfg.num_params()
    got = names(model)
    gated = cfg.mlp in ("swiglu", "geglu")
    assert ("model.layers.0.mlp.gate_proj.weight" in got) == gated
    assert got["model.layers.0.mlp.up_proj.weight"] == (cfg.ffn_dim, cfg.d_model)
    assert ("model.layers.0.input_layernorm.weight" in got) == (cfg.norm != "none")
    assert ("model.norm.weight" in got) == (
        cfg.norm != "none" and cfg.norm_position == "pre"
    )
    assert not [k for k in got if k.endswith(".bias")]  # layernorm has no bias


def test_each_option_changes_the_computation(tiny_config):
    """Same weights (where shapes agree), other option: other logits; so none of
    the options is silently ignored."""
    tokens = mx.array([[5, 17, 3, 44, 9, 60, 2, 81]])
    mx.random.seed(0)
    base = Model(tiny_config().model)
    want = base(tokens)
    for key in ("geglu", "layernorm", "no-norm", "post", "nope", "local-global"):
        other = Model(tiny_config(**OPTIONS[key]).model)
        other.update(base.parameters(), strict=False)
        got = other(tokens)
        assert not mx.allclose(got, want, atol=1e-4), key


def todays_forward(model: Model, tokens: mx.array) -> mx.array:
    """The default model's forward pass as written before the options existed:
    RMSNorm, RoPE'd grouped-query attention, SwiGLU, final RMSNorm, tied head."""
    cfg, bb = model.config, model.model
    h = bb.embed_tokens(tokens)
    B, L, _ = h.shape
    mask, hd = attention_mask(L), cfg.head_dim
    for layer in bb.layers:
        a, m = layer.self_attn, layer.mlp
        x = mx.fast.rms_norm(h, layer.input_layernorm.weight, cfg.norm_eps)
        q = a.q_proj(x).reshape(B, L, cfg.n_heads, hd).transpose(0, 2, 1, 3)
        k = a.k_proj(x).reshape(B, L, cfg.kv_heads, hd).transpose(0, 2, 1, 3)
        v = a.v_proj(x).reshape(B, L, cfg.kv_heads, hd).transpose(0, 2, 1, 3)
        rope = dict(traditional=False, base=cfg.rope_theta, scale=1.0, offset=0)
        q, k = mx.fast.rope(q, hd, **rope), mx.fast.rope(k, hd, **rope)
        out = kernels.attention(q, k, v, scale=hd**-0.5, mask=mask)
        h = h + a.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
        x = mx.fast.rms_norm(h, layer.post_attention_layernorm.weight, cfg.norm_eps)
        h = h + m.down_proj(kernels.silu(m.gate_proj(x)) * m.up_proj(x))
    h = mx.fast.rms_norm(h, bb.norm.weight, cfg.norm_eps)
    return bb.embed_tokens.as_linear(h)


def test_default_model_is_unchanged_bit_for_bit(tiny_config):
    defaults = {"mlp": "swiglu", "norm": "rmsnorm", "norm_position": "pre"}
    cfg = tiny_config(**defaults, position="rope").model
    assert cfg == tiny_config().model
    mx.random.seed(3)
    model = Model(cfg)
    flat = dict(tree_flatten(model.parameters()))
    for k, v in flat.items():
        if v.ndim == 1:  # norm weights off 1, so their use shows
            flat[k] = 1 + 0.3 * mx.random.normal(v.shape)
    model.load_weights(list(flat.items()))
    tokens = mx.random.randint(0, 97, (2, 20))
    got, want = model(tokens), todays_forward(model, tokens)
    assert mx.array_equal(got, want).item(), diff(got, want)
    d, f, kv = 32, 256, 2 * 8  # ffn: 8/3 * 32 rounded up to 256; kv heads 2 x 8
    layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (d, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, d),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    expected = {"model.embed_tokens.weight": (97, d), "model.norm.weight": (d,)}
    for i in range(2):
        expected.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    assert names(model) == expected


def test_width_rule_and_estimates():
    gated = ModelConfig(d_model=768)
    for mlp in ("silu", "gelu", "relu2"):
        plain = ModelConfig(d_model=768, mlp=mlp)
        assert plain.ffn_dim == 4 * 768 and gated.ffn_dim == 2048
        # two 768x3072 matrices against three 768x2048: the same size here
        assert plain.num_params() == gated.num_params()
        assert ModelConfig(d_model=768, mlp=mlp, d_ff=1000).ffn_dim == 1000
    assert ModelConfig(d_model=768, mlp="geglu").ffn_dim == 2048
    # the estimate: same parameters, a plain MLP saves 3 tensors of its width per
    # token and layer, a gated one 4 (fp32 bytes, batch 8, 2048 tokens, 16 layers)
    a = estimate_training_memory(gated, 8)
    b = estimate_training_memory(ModelConfig(d_model=768, mlp="relu2"), 8)
    assert b - a == 4 * 8 * 2048 * 16 * (3 * 3072 - 4 * 2048)
    none = ModelConfig(norm="none")
    assert ModelConfig().num_params() - none.num_params() == 768 * (2 * 16 + 1)


@pytest.mark.parametrize(
    "model, words",
    [
        ({"mlp": "swish"}, "model.mlp='swish': must be one of swiglu, geglu"),
        ({"norm": "batchnorm"}, "model.norm='batchnorm': must be one of rmsnorm"),
        ({"norm_position": "middle"}, "model.norm_position='middle'"),
        ({"position": "alibi"}, "model.position='alibi': must be one of rope, none"),
        ({"norm": "none", "norm_position": "post"}, "has no effect with model.norm"),
        ({"d_model": 36, "n_heads": 4}, "must be even for RoPE"),
    ],
)
def test_config_rules(model, words, tiny_config):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        tiny_config(**model)


def test_odd_head_dim_is_fine_without_rope(tiny_config):
    cfg = tiny_config(d_model=36, n_heads=4, n_kv_heads=2, position="none").model
    assert Model(cfg)(mx.zeros((1, 5), dtype=mx.int32)).shape == (1, 5, 97)


# --------------------------------------------------------------- training


STEP_OPTIONS = {  # between them, every option value but the plain silu and gelu
    "geglu-nope-no-norm": {"mlp": "geglu", "position": "none", "norm": "none"},
    "relu2-post-layernorm": OPTIONS["post-layernorm"] | {"mlp": "relu2"},
    "local-global": OPTIONS["local-global"],
}


@pytest.mark.parametrize("opts", STEP_OPTIONS.values(), ids=STEP_OPTIONS.keys())
def test_compiled_step_equals_eager(opts, tiny_config):
    data = [
        mx.array(np.random.default_rng(i).integers(0, 61, (2, 4, 17)), dtype=mx.int32)
        for i in range(4)
    ]
    training = dict(batch_size=4, grad_accum_steps=2, warmup_steps=2, max_steps=10,
                    learning_rate=3e-3)  # fmt: skip
    losses, params = [], []
    for compile in (True, False):
        cfg = tiny_config(training, vocab_size=61, context_length=16, **opts)
        mx.random.seed(0)
        model = Model(cfg.model)
        opt = build_optimizer(model, cfg.training)
        step = make_train_step(model, opt, cfg.training, compile=compile)
        run = []
        for b in data:
            loss, _, ok = step(b)
            mx.eval(model.state, opt.state, loss)
            assert ok.item()
            run.append(loss.item())
        losses.append(run)
        params.append(tree_flatten(model.parameters()))
    assert np.allclose(*losses, rtol=1e-5, atol=1e-5), losses
    assert losses[0][-1] < losses[0][0], losses  # it learns
    for (k, a), (_, b) in zip(*params):
        assert mx.allclose(a, b, atol=1e-5), f"{k}: {diff(a, b)}"


def test_training_runs_with_options(train_tiny, tmp_path):
    """configs/tiny.yaml trained through `python -m src.train --set model.X=...`:
    the run finishes, its loss falls, and the checkpoint loads and generates."""
    runs = {
        "relu2-post-layernorm": OPTIONS["post-layernorm"] | {"mlp": "relu2"},
        "geglu-nope-nonorm": {"mlp": "geglu", "position": "none", "norm": "none"},
    }
    for name, opts in runs.items():
        sets = {f"model__{k}": v for k, v in opts.items()}
        ck, logs = train_tiny(tmp_path / name, training__max_steps=30,
                              training__warmup_steps=5, eval__interval=0,
                              logging__interval=5, **sets)  # fmt: skip
        rows = [
            json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()
        ]
        losses = [r["loss"] for r in rows if "loss" in r]
        assert len(losses) >= 2 and losses[-1] < losses[0] - 0.5, (name, losses)
        model, tok, meta = load_model(ck / "latest")
        assert {k: meta["config"]["model"][k] for k in opts} == opts
        assert {k: getattr(model.config, k) for k in opts} == opts
        assert len(list(generate_tokens(model, tok.encode("Once"), 5))) == 5


def test_layernorm_is_layernorm(tiny_config):
    """norm=layernorm subtracts the mean (an input shifted by a constant gives the
    same output), which RMSNorm does not."""
    cfg = tiny_config(norm="layernorm").model
    norm = Model(cfg).model.layers[0].input_layernorm
    x = mx.random.normal((3, cfg.d_model))
    assert mx.allclose(norm(x), norm(x + 5.0), atol=1e-4)
    want = (x - x.mean(-1, keepdims=True)) / mx.sqrt(x.var(-1, keepdims=True) + 1e-5)
    assert mx.allclose(norm(x), want, atol=1e-5), diff(norm(x), want)
    rms = nn.RMSNorm(cfg.d_model)
    assert not mx.allclose(rms(x), rms(x + 5.0), atol=1e-2)
