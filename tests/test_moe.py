"""The mixture of experts (model.moe_experts, moe_top_k, training.moe_aux_loss):
routing and the batched experts against loop references, the load-balancing
loss and its place in the training loss, compiled == eager, cached generation,
the memory estimate, a real training run (utilisation in metrics.jsonl, resume
bit for bit), the PyTorch reference, the transformers export (mixtral,
qwen3_moe) and the refusals."""

import json
import math
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from commands import run, user_error
from mlx.utils import tree_flatten
from test_convert import convert_, make_checkpoint, mlx_greedy, mlx_logits

from src.checkpoint.contents import load_model
from src.config import ModelConfig
from src.data.loader import TokenLoader
from src.eval.evaluator import Evaluator, make_eval_fn
from src.inference.cache import make_cache
from src.inference.generate import Decoder, prefill
from src.model.loss import masked_mean_loss, mean_loss
from src.model.moe import Experts, MoE, balance, block_rows, route
from src.model.transformer import ACTIVATIONS, Model
from src.train.memory import estimate_training_memory
from src.train.optim import build_optimizer
from src.train.step import make_train_step

try:
    import torch

    from src.convert import torch_model
except ImportError:  # the optional `torch` extra
    torch = None
try:
    import transformers
except ImportError:
    transformers = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")
needs_transformers = pytest.mark.skipif(
    torch is None or transformers is None, reason="torch/transformers not installed"
)
MOE = {"moe_experts": 4, "moe_top_k": 2}
TOL = 1e-4  # fp32 logits, max absolute difference


def diff(a, b) -> str:
    d = np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32))
    return f"max {d.max():.3g} mean {d.mean():.3g}"


# ------------------------------------------------------------- the layer


@pytest.mark.parametrize("k", [1, 2, 4])
def test_routing_matches_a_numpy_reference(k):
    logits = np.random.default_rng(k).normal(size=(50, 4)).astype(np.float32) * 3
    probs, top, weights = route(mx.array(logits), k)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want_top = np.argsort(-p, axis=-1)[:, :k]  # the k most probable, best first
    want_w = np.take_along_axis(p, want_top, -1)
    want_w /= want_w.sum(-1, keepdims=True)
    got_top, got_w = np.array(top), np.array(weights)
    order = np.argsort(-np.take_along_axis(p, got_top, -1), axis=-1)  # best first
    got_top = np.take_along_axis(got_top, order, -1)
    got_w = np.take_along_axis(got_w, order, -1)
    assert (got_top == want_top).all()
    assert np.allclose(got_w, want_w, atol=1e-6), diff(got_w, want_w)
    assert np.allclose(np.array(probs), p, atol=1e-6)
    assert probs.dtype == mx.float32 and weights.dtype == mx.float32


@pytest.mark.parametrize(
    "mlp, n, skew",
    [("swiglu", 1, False), ("swiglu", 40, False), ("relu2", 40, False),
     ("swiglu", 700, False), ("swiglu", 700, True)],
)  # fmt: skip
def test_gather_mm_experts_equal_a_loop_over_experts(mlp, n, skew, tiny_config):
    """The batched experts (sorted assignments, gather_mm in blocks of 1, 4 and
    64 rows, an expert left without tokens when skewed) give each token's k
    expert outputs, and their gradients, as a plain per-expert loop does."""
    assert [block_rows(n * 2, 4) for n in (1, 40, 700)] == [1, 4, 64]
    cfg = tiny_config(mlp=mlp, **MOE).model
    mx.random.seed(1)
    experts = Experts(cfg, ACTIVATIONS[mlp])
    params = {
        k: 0.1 * mx.random.normal(v.shape)
        for k, v in tree_flatten(experts.parameters())
    }
    experts.update(nn.utils.tree_unflatten(list(params.items())))
    x = mx.random.normal((n, cfg.d_model))
    logits = mx.random.normal((n, 4)) + (mx.array([0, -99, 0, 0]) if skew else 0)
    _, top, _ = route(logits, 2)
    assert (1 in top.flatten().tolist()) != skew or n == 1  # expert 1 idle
    act = ACTIVATIONS[mlp]

    def loop(x, experts):
        out = mx.zeros((n, 2, cfg.d_model))
        for e in range(4):  # each expert on its tokens, as a dense MLP would
            up = x @ experts.up_proj.weight[e].T
            if mlp == "swiglu":
                h = act(x @ experts.gate_proj.weight[e].T) * up
            else:
                h = act(up)
            y = h @ experts.down_proj.weight[e].T  # (40, D): every token
            out = mx.where((top == e)[..., None], y[:, None, :], out)
        return out

    got, want = experts(x, top), loop(x, experts)
    assert mx.allclose(got, want, atol=1e-5), diff(got, want)

    def grads(f):
        def loss(p, x):
            experts.update(p)
            return (f(x, experts) ** 2).sum()

        return mx.grad(loss, argnums=(0, 1))(experts.trainable_parameters(), x)

    (g_ours, gx_ours) = grads(lambda x, ex: ex(x, top))
    (g_loop, gx_loop) = grads(loop)
    assert mx.allclose(gx_ours, gx_loop, atol=1e-4), diff(gx_ours, gx_loop)
    for (k, a), (_, b) in zip(tree_flatten(g_ours), tree_flatten(g_loop)):
        assert mx.allclose(a, b, atol=1e-4), f"{k}: {diff(a, b)}"


def test_balance_loss_on_hand_made_routings():
    """E * sum_e f_e P_e: 1.0 when tokens and probabilities are spread evenly, E
    when one expert gets every token and all the probability."""
    uniform = mx.full((8, 4), 0.25)
    top = mx.array([[0, 1], [2, 3]] * 4)  # each expert 4 of the 16 assignments
    r = balance(uniform, top)
    assert r.aux.item() == pytest.approx(1.0) and r.load.tolist() == [0.25] * 4
    one = mx.array([[1.0, 0, 0, 0]] * 8)
    r = balance(one, mx.zeros((8, 1), dtype=mx.uint32))
    assert r.aux.item() == pytest.approx(4.0) and r.load.tolist() == [1, 0, 0, 0]
    skewed = mx.array([[0.7, 0.1, 0.1, 0.1]] * 8)  # f = (1/2, 1/2, 0, 0) below
    r = balance(skewed, mx.array([[0, 1]] * 8))
    assert r.aux.item() == pytest.approx(4 * (0.5 * 0.7 + 0.5 * 0.1))


def test_moe_layer_shapes_names_and_counts(tiny_config):
    cfg = tiny_config(**MOE).model
    mx.random.seed(0)
    model = Model(cfg)
    got = {k: v.shape for k, v in tree_flatten(model.parameters())}
    E, d, f = 4, cfg.d_model, cfg.ffn_dim
    assert got["model.layers.1.mlp.gate.weight"] == (E, d)
    assert got["model.layers.1.mlp.experts.gate_proj.weight"] == (E, f, d)
    assert got["model.layers.1.mlp.experts.up_proj.weight"] == (E, f, d)
    assert got["model.layers.1.mlp.experts.down_proj.weight"] == (E, d, f)
    assert model.num_params() == cfg.num_params()
    assert isinstance(model.model.layers[0].mlp, MoE)
    tokens = mx.random.randint(0, 97, (2, 12))
    logits, routings = model.routed(tokens)
    assert mx.array_equal(logits, model(tokens)).item()
    assert len(routings) == 2 and all(r.load.shape == (4,) for r in routings)
    assert Model(tiny_config().model).routed(tokens)[1] == []  # dense: none
    # resid init: the experts' down projections as a dense down_proj
    std = model.model.layers[0].mlp.experts.down_proj.weight.flatten()
    assert float(mx.std(std)) < 0.6 * cfg.init_std


def test_aux_loss_reaches_the_training_loss(tiny_config):
    """mean loss = cross-entropy mean + alpha * (mean aux over the MoE layers),
    plain and masked; alpha 0 is the cross-entropy alone; the aux term's
    gradient reaches the routers."""
    cfg = tiny_config(**MOE).model
    mx.random.seed(0)
    model = Model(cfg)
    batch = mx.random.randint(0, 97, (3, 17))
    logits, routings = model.routed(batch[:, :-1])
    ce = nn.losses.cross_entropy(logits, batch[:, 1:])  # (3, 16)
    aux = sum(r.aux.item() for r in routings) / len(routings)
    assert aux > 0.9
    mask = mx.array(np.random.default_rng(0).random((3, 17)) < 0.5)
    counted = mask[:, 1:]
    masked_ce = (mx.where(counted, ce, 0).sum() / counted.sum()).item()
    for alpha in (0.0, 0.5):
        model.moe_aux_loss = alpha
        got = mean_loss(model, batch).item()
        assert got == pytest.approx(ce.mean().item() + alpha * aux, rel=1e-5)
        got = masked_mean_loss(model, batch, mask).item()
        assert got == pytest.approx(masked_ce + alpha * aux, rel=1e-5)

    def router_grad(alpha):
        model.moe_aux_loss = alpha

        def loss(p):
            model.update(p)
            return mean_loss(model, batch)

        g = mx.grad(loss)(model.trainable_parameters())
        return g["model"]["layers"][0]["mlp"]["gate"]["weight"]

    assert not mx.allclose(router_grad(0.0), router_grad(1.0), atol=1e-6)


def test_validation_reports_aux_and_expert_share(tiny_config, tmp_path):
    """The evaluator's MoE fields: the token-weighted mean aux and each layer's
    expert shares over the validation batches, as model.routed gives them; the
    loss is the cross-entropy alone; a dense model's result has neither."""
    from src.data.tokens import write_tokens

    cfg = tiny_config(**MOE).model
    mx.random.seed(0)
    model = Model(cfg)
    model.moe_aux_loss = 0.5  # must not leak into the validation loss
    ids = np.random.default_rng(0).integers(0, 97, 24 * 7 + 1)
    write_tokens(tmp_path / "v.bin", ids.tolist(), 97)
    loader = TokenLoader(tmp_path / "v.bin", 24, 97)
    ev = Evaluator(loader, 3, 10_000, lambda ids: "x" * len(ids))
    result = ev(make_eval_fn(model))
    aux, share, ce, n = 0.0, np.zeros((2, 4)), 0.0, 0
    for b in ev.batches:
        b = mx.array(b, dtype=mx.int32)
        logits, routings = model.routed(b[:, :-1])
        tokens = b[:, 1:].size
        ce += nn.losses.cross_entropy(logits, b[:, 1:]).sum().item()
        aux += tokens * np.mean([r.aux.item() for r in routings])
        share += tokens * np.array([r.load.tolist() for r in routings])
        n += tokens
    assert result.loss == pytest.approx(ce / n, rel=1e-5)
    assert result.moe_aux == pytest.approx(aux / n, rel=1e-5)
    assert np.allclose(result.expert_share, share / n, atol=1e-5)
    row = result.as_dict()
    assert row["val_moe_aux"] == result.moe_aux
    assert np.allclose(np.sum(row["val_expert_share"], axis=1), 1.0)
    dense = ev(make_eval_fn(Model(tiny_config().model)))
    assert set(dense.as_dict()) == {"val_loss", "val_ppl", "val_bpb", "val_tokens"}


@pytest.mark.parametrize("opts", [{}, {"gradient_checkpointing": True}])
def test_compiled_step_equals_eager(opts, tiny_config):
    data = [
        mx.array(np.random.default_rng(i).integers(0, 61, (2, 4, 17)), dtype=mx.int32)
        for i in range(4)
    ]
    training = dict(batch_size=4, grad_accum_steps=2, warmup_steps=2, max_steps=10,
                    learning_rate=3e-3)  # fmt: skip
    losses, params = [], []
    for compile in (True, False):
        cfg = tiny_config(training, vocab_size=61, context_length=16, **MOE, **opts)
        mx.random.seed(0)
        model = Model(cfg.model)
        model.moe_aux_loss = 0.1
        opt = build_optimizer(model, cfg.training)
        step = make_train_step(model, opt, cfg.training, compile=compile)
        run_losses = []
        for b in data:
            loss, _, ok = step(b)
            mx.eval(model.state, opt.state, loss)
            assert ok.item()
            run_losses.append(loss.item())
        losses.append(run_losses)
        params.append(tree_flatten(model.parameters()))
    assert np.allclose(*losses, rtol=1e-5, atol=1e-5), losses
    assert losses[0][-1] < losses[0][0], losses  # it learns
    for (k, a), (_, b) in zip(*params):
        assert mx.allclose(a, b, atol=1e-5), f"{k}: {diff(a, b)}"
    moved = [k for k, v in params[0] if "mlp.gate." in k or "experts" in k]
    assert len(moved) == 8  # router and 3 expert tensors per layer, all trained


@pytest.mark.parametrize("opts", [MOE, {"moe_experts": 3, "moe_top_k": 1}])
def test_cached_generation_equals_uncached(opts, tiny_config):
    mx.random.seed(0)
    model = Model(tiny_config(context_length=32, **opts).model)
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


def test_memory_estimate_knows_experts():
    """Weights: every expert (16 bytes per parameter with AdamW); activations:
    the k experts a token visits, their gathered rows and the router's."""
    dense = ModelConfig(d_model=256, n_layers=4, context_length=256, d_ff=512)
    moe = ModelConfig(d_model=256, n_layers=4, context_length=256, d_ff=512,
                      moe_experts=8, moe_top_k=2)  # fmt: skip
    extra_params = moe.num_params() - dense.num_params()
    assert extra_params == 4 * (7 * 3 * 256 * 512 + 256 * 8)
    acts = 2 * (4 * 512 + 2 * 256) + 2 * 8 - 4 * 512  # per token and layer
    got = estimate_training_memory(moe, 8) - estimate_training_memory(dense, 8)
    assert got == 16 * extra_params + 4 * 8 * 256 * 4 * acts


# --------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def moe_run(train_tiny, tmp_path_factory):
    """configs/tiny.yaml with 4 experts (top-2) for 20 steps, validating and
    saving at steps 10 and 20: (checkpoints, logs, the run's folder)."""
    out = tmp_path_factory.mktemp("moe")
    ck, logs = train_tiny(out, training__max_steps=20, eval__interval=10,
                          checkpoint__interval=10, logging__interval=1,
                          eval__sample_tokens=0, model__moe_experts=4,
                          model__moe_top_k=2)  # fmt: skip
    return ck, logs, out


def _rows(logs, event):
    rows = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event", "train") == event]


def test_utilisation_and_aux_are_in_the_metrics_log(moe_run, tiny_dataset):
    """Each validation row has val_moe_aux and val_expert_share (2 layers x 4
    experts, each layer summing to 1), the values the checkpoint gives again."""
    ck, logs, _ = moe_run
    evals = _rows(logs, "eval")
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert 0.5 < r["val_moe_aux"] < 4, r
        share = np.array(r["val_expert_share"])
        assert share.shape == (2, 4) and np.allclose(share.sum(axis=1), 1, atol=1e-5)
    model, tok, meta = load_model(ck / "step_00000020")
    assert model.config.moe_experts == 4
    loader = TokenLoader(tiny_dataset["val"], 64, 512, tok.sha256)
    ev = Evaluator(loader, 8, meta["config"]["eval"]["max_tokens"], tok.decode)
    again = ev(make_eval_fn(model)).as_dict()
    assert again["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-5)
    assert again["val_moe_aux"] == pytest.approx(evals[-1]["val_moe_aux"], rel=1e-4)
    assert np.allclose(again["val_expert_share"], evals[-1]["val_expert_share"])
    losses = [r["loss"] for r in _rows(logs, "train")]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5, losses


def test_resume_is_bit_exact(moe_run, train_tiny):
    """Rewinding the run to its step-10 checkpoint and training again gives
    steps 11..20 the same losses, bit for bit (CPU)."""
    ck, logs, out = moe_run
    before = {r["step"]: r["loss"] for r in _rows(logs, "train")}
    train_tiny(out, "--resume", str(ck / "step_00000010"), "--rewind",
               training__max_steps=20, eval__interval=10, checkpoint__interval=10,
               logging__interval=1, eval__sample_tokens=0, model__moe_experts=4,
               model__moe_top_k=2)  # fmt: skip
    after = {r["step"]: r["loss"] for r in _rows(logs, "train")}
    assert sorted(after) == list(range(1, 21))
    assert after == before
    (old,) = ck.glob("rewound-*/step_00000020")  # the first run's, moved aside
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = mx.load(str(old / name)), mx.load(str(ck / "step_00000020" / name))
        assert all(mx.array_equal(a[k], b[k]).item() for k in a), name


def test_bad_moe_config_exits_2():
    proc = run("train", "--config", "configs/tiny.yaml",
               "--set", "model.moe_experts=2", "--set", "model.moe_top_k=3")  # fmt: skip
    user_error(proc, "model.moe_top_k=3", "at most model.moe_experts=2")


# ----------------------------------------------------- export and parity


def _checkpoint(tmp_path, tiny_dataset, tiny_config, **opts):
    cfg = tiny_config(vocab_size=512, d_model=64, context_length=64, init_std=0.15,
                      n_kv_heads=2, tie_embeddings=False, **MOE, **opts)  # fmt: skip
    return make_checkpoint(tmp_path / "run", tiny_dataset["tokenizer"], cfg)


@needs_torch
@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_torch_reference_matches_mlx(mlp, tmp_path, tiny_dataset, tiny_config):
    """The `--to torch` export in the PyTorch reference (a loop over experts):
    logits and 32 greedy tokens equal ours."""
    path = _checkpoint(tmp_path, tiny_dataset, tiny_config, mlp=mlp)
    model, _, _ = load_model(path)
    ids = np.random.default_rng(0).integers(0, 512, 48).tolist()
    pt = tmp_path / "m.pt"
    assert convert_("--checkpoint", path, "--to", "torch", "--out", pt) == 0
    ref = torch_model.load(pt)  # strict
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).numpy()
    d = np.abs(mlx_logits(model, ids) - theirs)
    assert d.max() <= TOL, f"MLX vs torch reference: max {d.max():.3g}"
    assert mlx_greedy(model, ids) == torch_model.generate_greedy(ref, ids[:8], 32)


@needs_transformers
@pytest.mark.parametrize(
    "qk_norm, kind, cls",
    [(False, "mixtral", "MixtralForCausalLM"),
     (True, "qwen3_moe", "Qwen3MoeForCausalLM")],
)  # fmt: skip
def test_hf_export_parity_and_import(qk_norm, kind, cls, tmp_path, tiny_dataset,
                                     tiny_config):  # fmt: skip
    """`--to hf`: Mixtral without QK-norm, Qwen3-MoE with it; transformers loads
    the folder (fusing the per-expert tensors) and mlx-lm too, their logits equal
    ours; `--from hf` gives back our weights bit for bit, with or without the
    config we stash."""
    import mlx_lm
    from transformers import AutoModelForCausalLM

    from src.checkpoint.hf_folder import STASH, model_config_from_hf

    path = _checkpoint(tmp_path, tiny_dataset, tiny_config, qk_norm=qk_norm)
    model, _, _ = load_model(path)
    out = tmp_path / "hf"
    assert convert_("--checkpoint", path, "--to", "hf", "--out", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (kind, [cls])
    assert config["num_experts_per_tok"] == 2
    card = (out / "README.md").read_text()
    assert f"| type | `{kind}` ({cls}) |" in card and f"- {kind}\n" in card
    assert "| experts | 4 per layer, top-2 routed |" in card
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == cls
    ids = np.random.default_rng(1).integers(0, 512, 48).tolist()
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits.numpy()
    lm, _ = mlx_lm.load(str(out))
    for who, logits in (("transformers", theirs), ("mlx-lm", mlx_logits(lm, ids))):
        d = np.abs(mlx_logits(model, ids) - logits)
        print(f"{kind}: MLX vs {who} max |diff| {d.max():.3g}")
        assert d.max() <= TOL, f"{kind}: MLX vs {who}: max {d.max():.3g}"
    assert convert_("--from", "hf", out, "--out", tmp_path / "back") == 0
    back, _, _ = load_model(tmp_path / "back")
    assert back.config == model.config
    ours = dict(tree_flatten(model.parameters()))
    assert all(
        mx.array_equal(ours[k], v).item() for k, v in tree_flatten(back.parameters())
    )
    del config[STASH]  # the same folder from elsewhere
    imported = model_config_from_hf(config)
    assert (imported.moe_experts, imported.moe_top_k, imported.ffn_dim) == (
        4, 2, model.config.ffn_dim)  # fmt: skip


@pytest.mark.parametrize(
    "edits, words",
    [({"norm_topk_prob": False}, "norm_topk_prob=false"),
     ({"mlp_only_layers": [1]}, "dense layers among the experts"),
     ({"hidden_act": "gelu"}, "hidden_act='gelu' for experts"),
     ({"num_experts": 300}, "num_experts=300")],
)  # fmt: skip
def test_import_refuses_moe_it_cannot_run(edits, words):
    from src.checkpoint.hf_folder import model_config_from_hf
    from src.errors import ConvertError

    config = dict(model_type="qwen3_moe", vocab_size=512, hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                  moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                  norm_topk_prob=True)  # fmt: skip
    assert model_config_from_hf(config).moe_experts == 4
    with pytest.raises(ConvertError, match=re.escape(words)):
        model_config_from_hf(config | edits)


def test_export_refusals_name_the_option(tmp_path, tiny_dataset, tiny_config):
    """`python -m src.convert`: MoE with plain experts to hf, MoE to gguf: one
    error line, exit 2, nothing written."""
    relu2 = _checkpoint(tmp_path / "a", tiny_dataset, tiny_config, mlp="relu2")
    swiglu = _checkpoint(tmp_path / "b", tiny_dataset, tiny_config)
    cases = [
        (relu2, "hf", tmp_path / "hf", "model.mlp=relu2"),
        (swiglu, "gguf", tmp_path / "m.gguf", "model.moe_experts=4"),
    ]
    for path, to, out, words in cases:
        proc = run("convert", "--checkpoint", path, "--to", to, "--out", out)
        user_error(proc, words)
        assert not out.exists()


def test_active_parameters_of_the_preset_match_the_dense_one():
    """configs/moe.yaml: a token's FFN work equals configs/quickstart.yaml's."""
    from src.config import load_config

    moe = load_config("configs/moe.yaml").model
    dense = load_config("configs/quickstart.yaml").model
    idle = (moe.moe_experts - moe.moe_top_k) * 3 * moe.d_model * moe.ffn_dim
    active = moe.num_params() - moe.n_layers * idle
    assert math.isclose(active, dense.num_params(), rel_tol=0.01), (active, dense)


def test_the_run_sets_the_aux_weight(tiny_config):
    from src.train.assembly import assemble

    cfg = tiny_config({"moe_aux_loss": 0.25}, **MOE)
    assert assemble(cfg, compile=False).model.moe_aux_loss == 0.25
