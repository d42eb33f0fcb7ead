"""Muon (`training.optimizer: muon`, src/train/optim.py): Newton-Schulz (near
orthogonal, fp32), which parameters it takes (experts and router included), its
update against a numpy reference, decoupled decay, compiled == eager, streams
change no bit, bit-exact resume, a real run, a bad value refused, and the
benchmark's Muon-over-AdamW ratio."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from commands import run, user_error
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from src.backend import policy
from src.checkpoint.store import load_checkpoint, save_checkpoint
from src.model.transformer import Model
from src.train.optim import (
    NS_COEFFICIENTS,
    AdamW,
    Muon,
    build_optimizer,
    muon_mask,
    newton_schulz,
    ns_flops,
)
from src.train.schedule import lr_at
from src.train.step import make_train_step

ROOT = Path(__file__).resolve().parents[1]
MUON = dict(optimizer="muon", warmup_steps=2, max_steps=12, learning_rate=3e-3,
            muon_learning_rate=0.02, batch_size=4)  # fmt: skip


def ns_reference(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """The quintic Newton-Schulz iteration in float64, matrix by matrix."""
    if g.ndim > 2:
        return np.stack([ns_reference(m, steps) for m in g])
    x = g.astype(np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def gaussian(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def random_like(tree: dict, seed: int = 0) -> dict:
    """Gaussian arrays shaped like `tree`'s leaves, each from its own seed."""
    flat = tree_flatten(tree)
    leaves = {k: mx.array(gaussian(*p.shape, seed=100 * seed + i)) for i, (k, p) in enumerate(flat)}  # fmt: skip
    return tree_unflatten(list(leaves.items()))


def max_diff(a, b) -> str:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return f"max {d.max():.3g} mean {d.mean():.3g}"


# ------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (3, 24, 40)])
def test_newton_schulz_is_near_orthogonal_with_the_same_singular_vectors(shape):
    g = gaussian(*shape)
    out = np.array(newton_schulz(mx.array(g)))
    assert out.shape == g.shape
    for gm, om in zip(g.reshape(-1, *shape[-2:]), out.reshape(-1, *shape[-2:])):
        u, _, vt = np.linalg.svd(gm, full_matrices=False)
        s = np.linalg.svd(om, compute_uv=False)
        # the quintic's band (not exactly 1: fast coefficients, five steps)
        assert 0.6 < s.min() and s.max() < 1.25, (s.min(), s.max())
        core = u.T @ om @ vt.T  # diagonal when the singular vectors are kept
        off = core - np.diag(np.diag(core))
        assert np.abs(off).max() < 1e-3, np.abs(off).max()
    assert np.allclose(out, ns_reference(g), atol=2e-5), max_diff(out, ns_reference(g))


def test_newton_schulz_iterates_in_fp32_for_bf16_input():
    g = mx.array(gaussian(48, 128)).astype(mx.bfloat16)
    out = newton_schulz(g)
    assert out.dtype == mx.float32
    same = newton_schulz(g.astype(mx.float32))  # what iterating in fp32 gives
    assert mx.array_equal(out, same).item()
    # MLX's Muon iterates in the gradient's dtype: further from the exact result
    exact = ns_reference(np.array(g.astype(mx.float32)))
    in_bf16 = optim.Muon(0.1)._zeropower_via_newtonschulz5(g, 5).astype(mx.float32)
    ours, theirs = np.abs(np.array(out) - exact), np.abs(np.array(in_bf16) - exact)
    assert ours.max() < 1e-4 < theirs.max(), (ours.max(), theirs.max())


# ------------------------------------------------------- what goes where


def test_block_matrices_go_to_muon_the_rest_to_adamw(tiny_config):
    cfg = tiny_config(MUON, tie_embeddings=False, qk_norm=True)
    mx.random.seed(0)
    model = Model(cfg.model)
    route = dict(tree_flatten(muon_mask(model)))
    muon = {k for k, v in route.items() if v}
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    expected = {f"model.layers.{i}.{n}.weight" for i in range(2) for n in names}
    assert muon == expected
    adamw = set(route) - muon
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= adamw
    assert all("norm" in k for k in adamw - {"model.embed_tokens.weight", "lm_head.weight"})  # fmt: skip

    opt = build_optimizer(model, cfg.training)
    assert isinstance(opt, Muon)
    state = opt.state_dict()
    params = dict(tree_flatten(model.trainable_parameters()))
    for k in muon:  # one momentum buffer per element
        assert f"{k}.momentum" in state and f"{k}.m" not in state
    for k in adamw:  # Adam's two moments
        assert f"{k}.m" in state and f"{k}.v" in state and f"{k}.momentum" not in state
    n_muon = sum(params[k].size for k in muon)
    n_all = sum(p.size for p in params.values())
    assert opt.state_values() == n_muon + 2 * (n_all - n_muon)
    assert opt.state_per_param == pytest.approx((2 * n_all - n_muon) / n_all)
    assert 1 < opt.state_per_param < 2 and AdamW.state_per_param == 2
    line = opt.describe()
    assert line.startswith("optimizer: Muon on the 14 block matrices, ") and "AdamW on the rest" in line  # fmt: skip
    assert f"{n_muon / n_all:.0%} of the parameters (peak lr 0.02" in line

    # every parameter moves after one step (no group silently left out)
    grads = random_like(model.trainable_parameters())
    opt.update(model, grads)
    after = dict(tree_flatten(model.trainable_parameters()))
    still = [k for k in params if mx.array_equal(params[k], after[k]).item()]
    assert not still, still


def stacked_experts() -> nn.Module:
    """A stand-in for a mixture of experts: a (E, out, in) weight in a block, a
    gain beside it, and an embedding outside the blocks."""
    root, block = nn.Module(), nn.Module()
    block.experts = mx.array(gaussian(3, 8, 20))
    block.gain = mx.ones((8,))
    root.model = nn.Module()
    root.model.embed_tokens = nn.Embedding(10, 8)
    root.model.layers = [block]
    return root


def test_stacked_expert_weights_are_each_their_own_matrix(tiny_config):
    cfg = tiny_config(MUON).training
    model = stacked_experts()
    route = dict(tree_flatten(muon_mask(model)))
    assert route == {"model.embed_tokens.weight": False,
                     "model.layers.0.experts": True, "model.layers.0.gain": False}  # fmt: skip
    opt = Muon.build(model, cfg)
    w = np.array(model.model.layers[0].experts)
    g = gaussian(3, 8, 20, seed=1)
    grads = tree_map(mx.zeros_like, model.trainable_parameters())
    grads["model"]["layers"][0]["experts"] = mx.array(g)
    opt.update(model, grads)
    lr = lr_at(cfg, 0) / cfg.learning_rate * cfg.muon_learning_rate
    mu = cfg.muon_momentum
    # step 1: momentum (1 - mu) g, Nesterov input (1 - mu^2) g; each expert alone
    want = w - lr * np.stack([ns_reference((1 - mu**2) * e) for e in g])
    got = np.array(model.model.layers[0].experts)
    assert np.allclose(got, want, atol=1e-6), max_diff(got, want)


def test_a_mixture_of_experts_trains_its_experts_and_router_with_muon(tiny_config):
    cfg = tiny_config(MUON, moe_experts=4, moe_top_k=2)
    mx.random.seed(0)
    model = Model(cfg.model)
    params = dict(tree_flatten(model.trainable_parameters()))
    route = dict(tree_flatten(muon_mask(model)))
    stacked = [k for k, p in params.items() if p.ndim == 3]
    assert len(stacked) == 2 * 3 and all(route[k] for k in stacked)  # gate, up, down
    assert all(route[k] for k in params if k.endswith("mlp.gate.weight"))  # router
    opt = build_optimizer(model, cfg.training)
    matrices = sum(math.prod(p.shape[:-2]) for k, p in params.items() if route[k])
    assert matrices == 2 * (4 + 1 + 3 * 4)  # q k v o, the router, 3 x 4 experts
    assert opt.describe().startswith(
        f"optimizer: Muon on the {matrices} block matrices"
    )
    step = make_train_step(model, opt, cfg.training)
    batch = mx.array(np.random.default_rng(0).integers(0, 97, (1, 4, 25)), mx.int32)
    loss, _, ok = step(batch)
    mx.eval(model.state, opt.state, loss, ok)
    assert ok.item()
    after = dict(tree_flatten(model.trainable_parameters()))
    still = [k for k in params if mx.array_equal(params[k], after[k]).item()]
    assert not still, still


# ---------------------------------------------------------------- the update


def two_matrices() -> nn.Module:
    """A wide and a tall matrix inside a block, a gain, and a head."""
    root, block = nn.Module(), nn.Module()
    block.wide = mx.array(gaussian(16, 40, seed=2) * 0.1)
    block.tall = mx.array(gaussian(40, 16, seed=3) * 0.1)
    block.gain = mx.ones((16,))
    root.model = nn.Module()
    root.model.layers = [block]
    root.lm_head = nn.Linear(16, 12, bias=False)
    root.lm_head.weight = mx.array(gaussian(12, 16, seed=4) * 0.1)
    return root


def test_decay_is_decoupled(tiny_config):
    """With zero gradients only the decay acts: each Muon matrix shrinks by
    lr * wd (MLX's coupled L2 would orthogonalise wd * W instead), AdamW's
    matrices by its own lr * wd, gains not at all."""
    cfg = tiny_config({**MUON, "muon_weight_decay": 0.5, "weight_decay": 0.3}).training
    model = two_matrices()
    before = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    opt = Muon.build(model, cfg)
    opt.update(model, tree_map(mx.zeros_like, model.trainable_parameters()))
    after = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    lr = lr_at(cfg, 0)
    muon_lr = lr / cfg.learning_rate * cfg.muon_learning_rate
    for k in ("model.layers.0.wide", "model.layers.0.tall"):
        want = before[k] * np.float32(1 - muon_lr * 0.5)
        assert np.allclose(after[k], want, rtol=1e-6, atol=0), (k, max_diff(after[k], want))  # fmt: skip
    want = before["lm_head.weight"] * np.float32(1 - lr * 0.3)
    assert np.allclose(after["lm_head.weight"], want, rtol=1e-6, atol=0)
    assert np.array_equal(after["model.layers.0.gain"], before["model.layers.0.gain"])


def test_steps_equal_a_numpy_reference(tiny_config):
    """Three steps (momentum, Nesterov, Newton-Schulz, the shape scale, decay,
    the scheduled lr) against float64 numpy; the rest equals plain AdamW."""
    cfg = tiny_config({**MUON, "muon_weight_decay": 0.1, "muon_momentum": 0.9}).training
    model, plain = two_matrices(), two_matrices()
    opt, adamw = Muon.build(model, cfg), AdamW.build(plain, cfg)
    names = ("wide", "tall")
    w = {n: np.array(model.model.layers[0][n], np.float64) for n in names}
    buf = {n: np.zeros_like(w[n]) for n in names}
    mu, wd = cfg.muon_momentum, cfg.muon_weight_decay
    for step in range(3):
        grads = random_like(model.trainable_parameters(), seed=step)
        lr = lr_at(cfg, step) / cfg.learning_rate * cfg.muon_learning_rate
        for n in names:
            g = np.array(grads["model"]["layers"][0][n], np.float64)
            buf[n] = mu * buf[n] + (1 - mu) * g
            rows, cols = w[n].shape
            scale = max(1, rows / cols) ** 0.5
            w[n] = w[n] * (1 - lr * wd) - lr * scale * ns_reference(mu * buf[n] + (1 - mu) * g)  # fmt: skip
        opt.update(model, grads)
        adamw.update(plain, grads)
        mx.eval(model.parameters(), plain.parameters(), opt.state, adamw.state)
        assert opt.muon_lr.item() == pytest.approx(lr, rel=1e-6)
    for n in names:
        got = np.array(model.model.layers[0][n])
        assert np.allclose(got, w[n], atol=1e-6), (n, max_diff(got, w[n]))
        assert not np.allclose(got, np.array(plain.model.layers[0][n]), atol=1e-4)
    for k in ("model.layers.0.gain", "lm_head.weight"):  # AdamW's, bit for bit
        a = dict(tree_flatten(model.parameters()))[k]
        b = dict(tree_flatten(plain.parameters()))[k]
        assert mx.array_equal(a, b).item(), k


# ------------------------------------------------ the compiled step, resume


def training_cfg(tiny_config, **training):
    return tiny_config({**MUON, **training}, vocab_size=61, context_length=16).training


def setup(tiny_config, compile: bool, **training):
    cfg = tiny_config({**MUON, **training}, vocab_size=61, context_length=16)
    mx.random.seed(0)
    model = Model(cfg.model)
    opt = build_optimizer(model, cfg.training)
    return model, opt, make_train_step(model, opt, cfg.training, compile=compile)


def batches(n: int) -> list[mx.array]:
    rng = np.random.default_rng(0)
    return [mx.array(rng.integers(0, 61, (1, 4, 17)), mx.int32) for _ in range(n)]


def train(model, opt, step, data) -> list[float]:
    losses = []
    for batch in data:
        loss, _, ok = step(batch)
        mx.eval(model.state, opt.state, loss, ok)
        assert ok.item()
        losses.append(loss.item())
    return losses


def test_compiled_equals_eager(tiny_config):
    data = batches(5)
    m1, o1, s1 = setup(tiny_config, compile=True)
    m2, o2, s2 = setup(tiny_config, compile=False)
    l1, l2 = train(m1, o1, s1, data), train(m2, o2, s2, data)
    assert np.allclose(l1, l2, rtol=1e-5, atol=1e-5), (l1, l2)
    for (k, a), (_, b) in zip(tree_flatten(m1.parameters()), tree_flatten(m2.parameters())):  # fmt: skip
        assert np.allclose(np.array(a), np.array(b), atol=1e-5), (k, max_diff(a, b))


def test_newton_schulz_spread_over_streams_changes_no_bit(tiny_config):
    """The matrices' updates run on the step's streams (both cores on a 2-core
    CPU), balanced by their Newton-Schulz FLOPs; the result is the same."""
    data = batches(3)
    m1, o1, s1 = setup(tiny_config, compile=True)
    m2, o2, _ = setup(tiny_config, compile=True)
    o2.streams = policy.streams(3)
    s2 = make_train_step(m2, o2, training_cfg(tiny_config), compile=True)
    train(m1, o1, s1, data)
    train(m2, o2, s2, data)
    for (k, a), (_, b) in zip(tree_flatten(m1.parameters()), tree_flatten(m2.parameters())):  # fmt: skip
        assert mx.array_equal(a, b).item(), (k, max_diff(a, b))
    params = dict(tree_flatten(m2.trainable_parameters()))
    batches_ = o2._spread(params)
    paths = [k for _, group in batches_ for k in group]
    assert sorted(paths) == sorted(k for k, v in tree_flatten(o2.route) if v)
    load = {s: 0 for s in o2.streams}
    for stream, group in batches_:
        assert len({tuple(sorted(params[k].shape[-2:])) for k in group}) == 1, group
        load[stream] += sum(ns_flops(params[k].shape) for k in group)
    assert min(load.values()) > 0.5 * max(load.values()), load


def test_matrices_of_one_shape_are_one_newton_schulz_batch(tiny_config):
    """Wide and tall matrices of the same shape share a batch: each matrix's
    update equals Newton-Schulz of its own momentum alone."""
    cfg = tiny_config(MUON, vocab_size=61, context_length=16)
    model = Model(cfg.model)
    opt = build_optimizer(model, cfg.training)
    params = dict(tree_flatten(model.trainable_parameters()))
    grads = {k: mx.random.normal(p.shape, key=mx.random.key(i))
             for i, (k, p) in enumerate(params.items())}  # fmt: skip
    batches_ = opt._spread(grads)
    assert len(batches_) < sum(len(g) for _, g in batches_)  # some stacking happened
    updates = opt._muon_updates(grads, params)
    mu = opt.momentum
    for k, u in updates.items():
        g = grads[k]
        want = newton_schulz(mu * (1 - mu) * g + (1 - mu) * g)
        assert u.shape == g.shape
        assert np.allclose(np.array(u), np.array(want), atol=2e-5), (
            k,
            max_diff(u, want),
        )


def test_resume_is_bit_exact(tiny_config, tmp_path):
    """6 compiled steps straight == 3, a checkpoint on disk, a fresh model and
    optimizer loaded from it (in place, after their step was made), 3 more."""
    data = batches(6)
    m1, o1, s1 = setup(tiny_config, compile=True, muon_weight_decay=0.1)
    train(m1, o1, s1, data)

    m2, o2, s2 = setup(tiny_config, compile=True, muon_weight_decay=0.1)
    train(m2, o2, s2, data[:3])
    weights = dict(tree_flatten(m2.parameters()))
    path = save_checkpoint(tmp_path, 3, weights, o2.state_dict(), {})
    m3, o3, s3 = setup(tiny_config, compile=True, muon_weight_decay=0.1)
    w, state, meta = load_checkpoint(path)
    assert any(k.endswith(".momentum") for k in state) and "muon_learning_rate" in state
    m3.load_weights(list(w.items()), strict=True)
    o3.load_state_dict(state)
    assert o3.follow_run_step(meta["step"]) == 0
    train(m3, o3, s3, data[3:])

    for (k, a), (_, b) in zip(tree_flatten(m1.parameters()), tree_flatten(m3.parameters())):  # fmt: skip
        assert mx.array_equal(a, b).item(), (k, max_diff(a, b))
    s1_, s3_ = o1.state_dict(), o3.state_dict()
    assert set(s1_) == set(s3_)
    for k in s1_:
        assert mx.array_equal(s1_[k], s3_[k]).item(), k


def test_adamw_state_is_refused_by_muon_naming_both(tiny_config):
    model, opt, _ = setup(tiny_config, compile=False)
    adamw = AdamW.build(model, tiny_config(MUON).training)
    with pytest.raises(ValueError, match="optimizer state mismatch.*Muon"):
        opt.load_state_dict(adamw.state_dict())


# ------------------------------------------------------- through the CLI


def test_a_tiny_run_with_muon_learns(tmp_path, train_tiny):
    ck, logs = train_tiny(tmp_path, training__optimizer="muon",
                          training__max_steps=30, eval__interval=30,
                          checkpoint__interval=30)  # fmt: skip
    rows = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("event") == "train"]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5, losses
    _, state, _ = load_checkpoint(ck / "latest")
    assert any(k.endswith(".momentum") for k in state)


def test_a_bad_muon_momentum_is_one_error_line():
    proc = run("train", "--config", "configs/tiny.yaml",
               "--set", "training.optimizer=muon", "--set", "training.muon_momentum=1")  # fmt: skip
    user_error(proc, "training.muon_momentum", "[0, 1)")


def test_benchmark_times_muon_beside_adamw(tmp_path):
    """scripts/benchmark.py --impls ours ours_muon: both steps from the same
    weights and batch, and Muon's step time over AdamW's in the report."""
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--shapes", "tiny", "--impls", "ours",
         "ours_muon", "--rounds", "1", "--warmup", "1", "--out", str(tmp_path / "b")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())["tiny"]
    rows = res["results"]
    assert list(rows) == ["ours", "ours_muon"]
    assert rows["ours"]["loss1"] == pytest.approx(rows["ours_muon"]["loss1"], abs=1e-5)
    assert res["muon_step_ratio"] == rows["ours"]["tok_s"] / rows["ours_muon"]["tok_s"]
    md = (tmp_path / "b.md").read_text()
    assert f"(step time, ours_muon / ours): **{res['muon_step_ratio']:.2f}×**" in md


def test_resume_refuses_another_optimizer(train_tiny, tmp_path, tiny_dataset):
    """The checkpoint's optimizer state is AdamW's: resuming it as Muon is refused
    up front, naming the key (a new run from it is --init-from)."""
    import subprocess
    import sys

    ck, _ = train_tiny(tmp_path, training__max_steps=4, eval__interval=0)
    sets = {"data.train_path": tiny_dataset["train"],
            "data.val_path": tiny_dataset["val"],
            "data.tokenizer_path": tiny_dataset["tokenizer"],
            "checkpoint.dir": tmp_path / "ck", "logging.dir": tmp_path / "logs",
            "training.max_steps": 8, "training.optimizer": "muon"}  # fmt: skip
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", "--config", "configs/tiny.yaml", *args,
         "--resume", "auto"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.startswith("error: cannot resume")
        and "Traceback" not in proc.stderr
    )
    assert "training.optimizer: checkpoint 'adamw' -> now 'muon'" in proc.stderr
