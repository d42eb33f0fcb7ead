"""The 2025-26 small-model recipe options (issue 18): model.value_embeddings,
zero_init_residual, logit_softcap and residual_scalars. Each one's config rule
(in-process and through `python -m src.train`), its effect on the model, parity
with the PyTorch reference (each and all together), the compiled training step,
gradient checkpointing, stream shards, MatFormer, cached generation, a real run
with resume, and the exports that must refuse them."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml
from commands import ROOT, run, user_error
from mlx.utils import tree_flatten
from test_convert import assert_close, convert_, mlx_greedy, mlx_logits, torch

from src.checkpoint import store as ckpt
from src.checkpoint.contents import build_meta, load_model
from src.config import ModelConfig
from src.errors import ConfigError
from src.inference.cache import make_cache
from src.inference.generate import Decoder, generate_step, generate_tokens, prefill
from src.inference.sampling import Sampling
from src.model import matformer
from src.model.loss import summed_loss
from src.model.masks import attention_mask
from src.model.transformer import Model
from src.tokenizer.spm import Tokenizer
from src.train.optim import build_optimizer, decay_mask, muon_mask
from src.train.step import make_train_step

if torch is not None:
    from src.convert import torch_model

RECIPE = {
    "value-embeddings": {"value_embeddings": True},
    "zero-init": {"zero_init_residual": True},
    "softcap": {"logit_softcap": 3.0},
    "residual-scalars": {"residual_scalars": True},
}
ALL = {k: v for opts in RECIPE.values() for k, v in opts.items()}
OFF = {"value_embeddings": False, "zero_init_residual": False, "logit_softcap": 0.0,
       "residual_scalars": False}  # fmt: skip
needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


def diff(a, b) -> str:
    d = np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32))
    return f"max {d.max():.3g} mean {d.mean():.3g}"


def params(model) -> dict:
    return dict(tree_flatten(model.parameters()))


def build(tiny_config, seed=0, **opts) -> Model:
    mx.random.seed(seed)
    return Model(tiny_config(**opts).model)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "opts, words",
    [
        ({"logit_softcap": -1}, "model.logit_softcap=-1.0: must be 0 or in [0.001"),
        ({"logit_softcap": "nan"}, "model.logit_softcap=nan: must be a finite number"),
        ({"logit_softcap": "inf"}, "model.logit_softcap=inf: must be a finite"),
        ({"logit_softcap": "x"}, "model.logit_softcap='x': expected a number"),
        ({"value_embeddings": "yes"}, "model.value_embeddings='yes': expected true"),
        ({"zero_init_residual": 1}, "model.zero_init_residual=1: expected true"),
        ({"residual_scalars": "on"}, "model.residual_scalars='on': expected true"),
    ],
)
def test_config_rules(opts, words, tiny_config):
    with pytest.raises(ConfigError) as e:
        tiny_config(**opts)
    assert words in str(e.value), str(e.value)


def test_bad_values_through_the_cli(tmp_path):
    """A config file with a bad value and a bad --set: exit 2, one error line
    naming the key, the value and the rule."""
    data = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    data["model"]["logit_softcap"] = -2.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = run("train", "--config", bad)
    user_error(proc, "model.logit_softcap=-2.5", "must be 0 or in")
    proc = run("train", "--config", "configs/tiny.yaml",
               "--set", "model.value_embeddings=maybe")  # fmt: skip
    user_error(proc, "model.value_embeddings='maybe'", "expected true or false")


# ------------------------------------------------------------ the model


def test_defaults_are_off_and_change_nothing(tiny_config):
    """Every option off by default; stated off it is the same model, bit for bit,
    with no new parameter (tests/test_model_options.py checks the default model
    against its hand-written forward pass)."""
    assert {k: getattr(ModelConfig(), k) for k in OFF} == OFF
    assert tiny_config(**OFF).model == tiny_config().model
    a, b = build(tiny_config, 3), build(tiny_config, 3, **OFF)
    assert params(a).keys() == params(b).keys()
    assert not [k for k in params(a) if "value_embed" in k or "residual_sc" in k]
    tokens = mx.random.randint(0, 97, (2, 12))
    assert mx.array_equal(a(tokens), b(tokens)).item()
    assert ModelConfig(**OFF).num_params() == ModelConfig().num_params()


@pytest.mark.parametrize("n_layers, layers", [(4, [1, 3]), (3, [0, 2]), (1, [0])])
def test_value_embedding_tables_on_alternating_layers(n_layers, layers, tiny_config):
    cfg = tiny_config(n_layers=n_layers, init_std=0.05, value_embeddings=True).model
    model = build(tiny_config, n_layers=n_layers, init_std=0.05,
                  value_embeddings=True)  # fmt: skip
    got = {k: v for k, v in params(model).items() if "value_embed" in k}
    assert got.keys() == {f"model.layers.{i}.value_embed.weight" for i in layers}
    for w in got.values():  # vocab x kv_heads * head_dim = 97 x 2 * 8, N(0, 0.05)
        assert w.shape == (97, 16)
        assert abs(w.mean().item()) < 0.01 and 0.045 < w.std().item() < 0.055
    assert model.num_params() == cfg.num_params()
    assert cfg.num_params() - tiny_config(n_layers=n_layers).model.num_params() == (
        len(layers) * 97 * 16
    )


def test_value_embeddings_add_to_the_values(tiny_config):
    """Zero tables: the plain model's logits; a table row for one token changes
    the logits from that token's position on (values only flow forward)."""
    model = build(tiny_config, value_embeddings=True)
    plain = Model(tiny_config().model)
    plain.update(model.parameters(), strict=False)
    tokens = mx.array([[5, 17, 3, 44, 9, 60, 2, 81]])
    with_ve = model(tokens)
    assert not mx.allclose(with_ve, plain(tokens), atol=1e-4)
    table = model.model.layers[1].value_embed.weight
    model.model.layers[1].value_embed.weight = mx.zeros_like(table)
    assert mx.allclose(model(tokens), plain(tokens), atol=1e-6)
    model.model.layers[1].value_embed.weight = mx.zeros_like(table).at[44].add(1.0)
    moved = mx.abs(model(tokens) - plain(tokens)).max(axis=-1)[0]
    assert (moved[:3] < 1e-6).all().item() and (moved[3:] > 1e-4).all().item()


def test_zero_init_residual(tiny_config):
    """o_proj, down_proj and the experts' down weights start at exactly zero, the
    other weights are the default model's, so every block starts as the identity:
    the logits are the embedding's through the final norm and the head."""
    for extra in ({}, {"moe_experts": 4}):
        model = build(tiny_config, zero_init_residual=True, **extra)
        plain = build(tiny_config, **extra)
        for k, v in params(model).items():
            if k.endswith(("o_proj.weight", "down_proj.weight")):
                assert not v.any().item(), k
            else:
                assert mx.array_equal(v, params(plain)[k]).item(), k
        assert any("experts.down_proj" in k for k in params(model)) == bool(extra)
        tokens = mx.random.randint(0, 97, (2, 10))
        bb = model.model
        want = bb.embed_tokens.as_linear(bb.norm(bb.embed_tokens(tokens)))
        assert mx.array_equal(model(tokens), want).item(), diff(model(tokens), want)


def test_logit_softcap(tiny_config):
    """c * tanh(logits / c) of the uncapped model's logits, in fp32 also when the
    weights are bf16, and inside (-c, c)."""
    model = build(tiny_config, init_std=0.5, logit_softcap=3.0)
    plain = Model(tiny_config(init_std=0.5).model)
    plain.update(model.parameters())
    tokens = mx.random.randint(0, 97, (2, 10))
    raw, capped = plain(tokens), model(tokens)
    assert mx.abs(raw).max().item() > 6  # the cap matters here
    assert mx.abs(capped).max().item() < 3.0
    assert mx.allclose(capped, 3.0 * mx.tanh(raw / 3.0), atol=1e-6)
    model.set_dtype(mx.bfloat16)
    assert model(tokens).dtype == mx.float32


def test_residual_scalars(tiny_config):
    """One (2,) parameter per block, (1, 0) at the start (the plain model's
    logits, bit for bit); then h = a * h + b * x0 before each block."""
    model = build(tiny_config, residual_scalars=True)
    got = {k: v for k, v in params(model).items() if "residual_scalars" in k}
    assert got.keys() == {f"model.layers.{i}.residual_scalars" for i in range(2)}
    assert all(v.tolist() == [1.0, 0.0] for v in got.values())
    assert model.num_params() == tiny_config(residual_scalars=True).model.num_params()
    plain = Model(tiny_config().model)
    plain.update(model.parameters(), strict=False)
    tokens = mx.random.randint(0, 97, (2, 10))
    assert mx.array_equal(model(tokens), plain(tokens)).item()
    model.model.layers[1].residual_scalars = mx.array([0.5, 2.0])
    x0, mask = plain.model.embed_tokens(tokens), attention_mask(tokens.shape[1])
    h = plain.model.layers[0](x0, mask)
    h = plain.model.layers[1](0.5 * h + 2.0 * x0, mask)
    want = plain.model.embed_tokens.as_linear(plain.model.norm(h))
    assert mx.allclose(model(tokens), want, atol=1e-5), diff(model(tokens), want)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizers_treat_the_new_parameters_right(optimizer, tiny_config):
    """Residual scalars are gains (no decay, AdamW under Muon); value embedding
    tables are not Muon matrices; after one step every parameter has moved."""
    cfg = tiny_config({"optimizer": optimizer, "warmup_steps": 0}, n_layers=3,
                      value_embeddings=True, residual_scalars=True)  # fmt: skip
    mx.random.seed(0)
    model = Model(cfg.model)
    route = dict(tree_flatten(muon_mask(model)))
    decay = dict(tree_flatten(decay_mask(model, False)))
    for k in params(model):
        if "residual_scalars" in k:
            assert not route[k] and not decay[k], k
        if "value_embed" in k:
            assert not route[k], k
    opt = build_optimizer(model, cfg.training)
    step = make_train_step(model, opt, cfg.training, compile=False)
    before = params(model)
    batch = mx.array(np.random.default_rng(0).integers(0, 97, (1, 4, 17)), mx.int32)
    _, _, ok = step(batch)
    mx.eval(model.state, opt.state)
    assert ok.item()
    for k, v in params(model).items():
        assert not mx.array_equal(v, before[k]).item(), f"{k} did not move"


# --------------------------------------------- training paths, all options on


STEP_OPTIONS = {
    "all": ALL,
    "all-checkpointed-local": ALL | {"gradient_checkpointing": True, "n_layers": 3,
                                     "sliding_window": 4, "global_every": 2},
    "all-moe": ALL | {"moe_experts": 4, "d_ff": 64},
}  # fmt: skip


@pytest.mark.parametrize("opts", STEP_OPTIONS.values(), ids=STEP_OPTIONS.keys())
def test_compiled_step_equals_eager(opts, tiny_config):
    data = [
        mx.array(np.random.default_rng(i).integers(0, 61, (2, 4, 17)), dtype=mx.int32)
        for i in range(4)
    ]
    training = dict(batch_size=4, grad_accum_steps=2, warmup_steps=2, max_steps=10,
                    learning_rate=3e-3)  # fmt: skip
    losses, weights = [], []
    for compile in (True, False):
        cfg = tiny_config(training, vocab_size=61, context_length=16, **opts)
        mx.random.seed(0)
        model = Model(cfg.model)
        opt = build_optimizer(model, cfg.training)
        step = make_train_step(model, opt, cfg.training, compile=compile)
        run_ = []
        for b in data:
            loss, _, ok = step(b)
            mx.eval(model.state, opt.state, loss)
            assert ok.item()
            run_.append(loss.item())
        losses.append(run_)
        weights.append(tree_flatten(model.parameters()))
    assert np.allclose(*losses, rtol=1e-5, atol=1e-5), losses
    assert losses[0][-1] < losses[0][0], losses  # it learns
    for (k, a), (_, b) in zip(*weights):
        assert mx.allclose(a, b, atol=1e-5), f"{k}: {diff(a, b)}"


def test_checkpointed_gradients_and_stream_shards_are_exact(tiny_config):
    """Gradient checkpointing and a batch split over two streams give the same
    loss and gradients, x0's path and the value embeddings' included."""
    opts = ALL | {"zero_init_residual": False, "n_layers": 3}
    batch = mx.array(np.random.default_rng(5).integers(0, 97, (4, 13)), mx.int32)
    from src.backend import policy

    def grads(checkpointing=False, streams=None):
        model = build(tiny_config, gradient_checkpointing=checkpointing, **opts)
        model.model.layers[2].residual_scalars = mx.array([0.8, 0.3])  # x0 used

        def loss(m):
            return summed_loss(m, batch, streams)

        value, g = nn.value_and_grad(model, loss)(model)
        return value, dict(tree_flatten(g))

    want_loss, want = grads()
    assert want["model.embed_tokens.weight"].any().item()
    for kw in ({"checkpointing": True}, {"streams": policy.streams(2)}):
        got_loss, got = grads(**kw)
        assert mx.allclose(got_loss, want_loss, rtol=1e-5), (kw, got_loss, want_loss)
        for k in want:
            assert mx.allclose(got[k], want[k], atol=1e-5), f"{kw} {k}: {diff(got[k], want[k])}"  # fmt: skip


def test_matformer_width_with_value_embeddings(tiny_config):
    """A narrowed MatFormer model keeps the value embeddings and computes what
    the whole model does at that width."""
    model = build(tiny_config, matformer_widths=[0.5, 1.0], **ALL)
    tokens = mx.random.randint(0, 97, (2, 10))
    with matformer.use_width(model, 0.5):
        want = model(tokens)
    small = matformer.narrowed(model, 0.5)
    assert any("value_embed" in k for k in params(small))
    assert mx.allclose(small(tokens), want, atol=1e-5), diff(small(tokens), want)


GENERATE_OPTIONS = {
    "value-embeddings": {"value_embeddings": True, "n_layers": 3},
    "all": ALL | {"zero_init_residual": False},
    "all-local": ALL | {"zero_init_residual": False, "n_layers": 3,
                        "sliding_window": 4, "global_every": 2},
}  # fmt: skip


@pytest.mark.parametrize("opts", GENERATE_OPTIONS.values(), ids=GENERATE_OPTIONS.keys())
def test_cached_equals_uncached(opts, tiny_config):
    """Chunked prefill then cached steps, eager and compiled, give a full
    recompute's logits; greedy tokens equal the uncached ones."""
    model = build(tiny_config, context_length=32, init_std=0.1, **opts)
    seq = mx.array(np.random.default_rng(3).integers(0, 97, (2, 20)))
    full = model(seq)
    eager, cache = make_cache(model), make_cache(model)
    got = [prefill(model, seq[:, :7], eager, 3)]
    prefill(model, seq[:, :7], cache, 100)
    decoder = Decoder(model, bucket=4)
    for t in range(7, 20):
        got.append(model(seq[:, t : t + 1], cache=eager)[:, -1, :])
        step = decoder(seq[:, t : t + 1], cache)
        assert mx.allclose(step, full[:, t], atol=2e-5), (t, diff(step, full[:, t]))
    got = mx.stack(got, axis=1)
    assert mx.allclose(got, full[:, 6:], atol=2e-5), diff(got, full[:, 6:])
    s = Sampling(temperature=0, max_tokens=15)
    prompt = mx.array([[5, 17, 3, 44, 9]])
    runs = [
        [y.tolist() for y in generate_step(model, prompt, s, c, None, None)]
        for c in (make_cache(model), None)
    ]
    assert runs[0] == runs[1]


# ----------------------------------------------- parity and export


def checkpoint(tmp_path, tiny_dataset, tiny_config, **opts):
    """A checkpoint with random, non-trivial weights: norm weights and residual
    scalars off their start, all-zero matrices (zero init) drawn as if trained."""
    cfg = tiny_config(vocab_size=512, d_model=64, context_length=64, init_std=0.15,
                      n_kv_heads=2, tie_embeddings=False, **opts)  # fmt: skip
    mx.random.seed(0)
    weights = params(Model(cfg.model))
    for k, v in weights.items():
        if v.ndim == 1:
            weights[k] = 1 + 0.3 * mx.random.normal(v.shape)
        elif not v.any().item():
            weights[k] = 0.05 * mx.random.normal(v.shape)
    sha = Tokenizer.load(tiny_dataset["tokenizer"]).sha256
    meta = build_meta(cfg, sha)
    return ckpt.save_checkpoint(tmp_path / "run", 7, weights, {}, meta,
                                tiny_dataset["tokenizer"])  # fmt: skip


PARITY = RECIPE | {"all": ALL, "all-moe-local": ALL | {"moe_experts": 4,
                   "sliding_window": 8, "global_every": 2, "n_layers": 3}}  # fmt: skip


@needs_torch
@pytest.mark.parametrize("opts", PARITY.values(), ids=PARITY.keys())
def test_torch_reference_matches_mlx(opts, tmp_path, tiny_dataset, tiny_config):
    """`--to torch` loaded strictly: logits and 32 greedy tokens equal ours."""
    path = checkpoint(tmp_path, tiny_dataset, tiny_config, **opts)
    model, _, _ = load_model(path)
    ids = np.random.default_rng(0).integers(0, 512, 48).tolist()
    pt = tmp_path / "m.pt"
    assert convert_("--checkpoint", path, "--to", "torch", "--out", pt) == 0
    ref = torch_model.load(pt)  # strict=True inside
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).numpy()
    assert_close(mlx_logits(model, ids), theirs, f"{opts}: MLX vs torch reference")
    assert mlx_greedy(model, ids) == torch_model.generate_greedy(ref, ids[:8], 32)
    if opts is ALL:  # the comparison can fail: a reference without VE, or the cap
        for layer in ref.model.layers:
            layer.__dict__["_modules"].pop("value_embed", None)
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).numpy()
        assert np.abs(mlx_logits(model, ids) - theirs).max() > 1e-2
        ref = torch_model.load(pt)
        ref.config.logit_softcap = 0.0
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).numpy()
        assert np.abs(mlx_logits(model, ids) - theirs).max() > 1e-2


# ------------------------------------------- a real run, resume, export


@pytest.fixture(scope="module")
def recipe_run(train_tiny, tmp_path_factory):
    """configs/tiny.yaml with every option on, 20 steps, checkpoints at 10, 20."""
    out = tmp_path_factory.mktemp("recipe")
    sets = {f"model__{k}": str(v).lower() for k, v in ALL.items()}
    ck, logs = train_tiny(out, training__max_steps=20, training__warmup_steps=5,
                          eval__interval=0, eval__sample_tokens=0,
                          checkpoint__interval=10, logging__interval=1,
                          **sets)  # fmt: skip
    return ck, logs, out, sets


def _losses(logs) -> dict[int, float]:
    rows = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


def test_a_run_with_every_option_learns_and_generates(recipe_run):
    ck, logs, _, _ = recipe_run
    losses = list(_losses(logs).values())
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5, losses
    model, tok, meta = load_model(ck / "latest")
    assert {k: meta["config"]["model"][k] for k in ALL} == ALL
    assert any("value_embed" in k for k in params(model))
    scalars = model.model.layers[0].residual_scalars.tolist()
    assert scalars != [1.0, 0.0]  # trained
    assert len(list(generate_tokens(model, tok.encode("Once"), 5))) == 5


def test_resume_is_bit_exact(recipe_run, train_tiny):
    """Rewinding to the step-10 checkpoint and training again gives steps 11..20
    the same losses and weights, bit for bit: the new parameters and their
    optimizer state are saved and loaded."""
    ck, logs, out, sets = recipe_run
    before = _losses(logs)
    last = mx.load(str(ck / "step_00000020" / "model.safetensors"))
    mx.eval(last)  # read now: the rewind moves that folder aside
    train_tiny(out, "--resume", str(ck / "step_00000010"), "--rewind",
               training__max_steps=20, training__warmup_steps=5, eval__interval=0,
               eval__sample_tokens=0, checkpoint__interval=10, logging__interval=1,
               **sets)  # fmt: skip
    assert _losses(logs) == before
    again = mx.load(str(ck / "step_00000020" / "model.safetensors"))
    assert any(k.endswith("residual_scalars") for k in again)
    assert all(mx.array_equal(last[k], again[k]).item() for k in last)


@pytest.mark.parametrize("to, out", [("hf", "hf"), ("gguf", "m.gguf")])
def test_exports_refuse_the_options_by_name(to, out, recipe_run, tmp_path):
    ck = recipe_run[0] / "latest"
    proc = run("convert", "--checkpoint", ck, "--to", to, "--out", tmp_path / out)
    line = user_error(proc, "model.value_embeddings=true", "model.logit_softcap=3.0",
                      "model.residual_scalars=true")  # fmt: skip
    assert "zero_init_residual" not in line and not (tmp_path / out).exists()


@pytest.mark.parametrize("option", ["value-embeddings", "softcap", "residual-scalars"])
def test_hf_export_refuses_each_option(option, tmp_path, tiny_dataset, tiny_config,
                                       capsys):  # fmt: skip
    path = checkpoint(tmp_path, tiny_dataset, tiny_config, **RECIPE[option])
    assert convert_("--checkpoint", path, "--to", "hf", "--out", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    (key,) = RECIPE[option]
    assert err.startswith("error: ") and f"model.{key}=" in err, err
    assert not (tmp_path / "hf").exists()


def test_zero_init_exports_as_plain_llama(tmp_path, tiny_dataset, tiny_config):
    """Zero init sets only the starting weights: the trained model is a Llama."""
    path = checkpoint(tmp_path, tiny_dataset, tiny_config, zero_init_residual=True)
    out = tmp_path / "hf"
    assert convert_("--checkpoint", path, "--to", "hf", "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert "residual output projections at zero" in (out / "README.md").read_text()
