"""The training step: compiled == eager, learning, guards, optimizer details."""

import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from src.backend.policy import BFS_WIDTH, BFS_WIDTH_VAR, keep_step_buffers
from src.config import TrainingConfig
from src.model.transformer import Model
from src.train.optim import build_optimizer, decay_mask
from src.train.schedule import lr_schedule
from src.train.step import make_train_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tiny_config):
    """setup(compile, accum=2, **training) -> (model, optimizer, step, config) of
    a tiny model (vocab 61, context 16) seeded with 0."""

    def make(compile, accum=2, **train):
        dropout = train.pop("dropout", 0.0)
        training = dict(batch_size=4, grad_accum_steps=accum, warmup_steps=3,
                        max_steps=30, learning_rate=3e-3)  # fmt: skip
        training.update(train)
        cfg = tiny_config(training, vocab_size=61, context_length=16, dropout=dropout)
        mx.random.seed(0)
        model = Model(cfg.model)
        opt = build_optimizer(model, cfg.training)
        step = make_train_step(model, opt, cfg.training, compile=compile)
        return model, opt, step, cfg

    return make


def batches(n, accum=2, seed=0):
    rng = np.random.default_rng(seed)
    return [
        mx.array(rng.integers(0, 61, (accum, 4, 17)), dtype=mx.int32) for _ in range(n)
    ]


def run(step, model, opt, data, seed=None):
    losses = []
    for i, b in enumerate(data):
        if seed is not None:
            mx.random.seed(seed + i)
        loss, gnorm, ok = step(b)
        mx.eval(model.state, opt.state, loss)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_equals_eager(dropout, setup):
    data = batches(6)
    m1, o1, s1, _ = setup(compile=True, dropout=dropout)
    m2, o2, s2, _ = setup(compile=False, dropout=dropout)
    l1, l2 = run(s1, m1, o1, data, seed=7), run(s2, m2, o2, data, seed=7)
    assert np.allclose(l1, l2, rtol=1e-5, atol=1e-5), (l1, l2)
    for (k, a), (_, b) in zip(
        tree_flatten(m1.parameters()), tree_flatten(m2.parameters())
    ):
        d = mx.abs(a - b)
        assert d.max().item() < 1e-5, (
            f"{k}: max {d.max().item():.3g} mean {d.mean().item():.3g}"
        )


@pytest.mark.parametrize("streams", [2, 3, 8])
def test_rows_split_over_streams_equal_one_stream(streams, setup):
    """The fast path (each micro-batch's rows split over CPU streams, compiled) gives
    the single-stream eager step's losses and weights; 3 streams split 4 rows
    unevenly, 8 streams are more than the rows."""
    data = batches(4)
    m1, o1, s1, _ = setup(compile=True, streams=streams)
    m2, o2, s2, _ = setup(compile=False, streams=1)
    l1, l2 = run(s1, m1, o1, data), run(s2, m2, o2, data)
    assert np.allclose(l1, l2, rtol=1e-5, atol=1e-6), (l1, l2)
    for (k, a), (_, b) in zip(
        tree_flatten(m1.parameters()), tree_flatten(m2.parameters())
    ):
        assert mx.abs(a - b).max().item() < 1e-5, k


def test_accumulation_equals_big_batch(setup):
    """2 micro-batches of 4 == one batch of 8 (same mean loss and update)."""
    data = batches(3, accum=2)
    m1, o1, s1, _ = setup(compile=True, accum=2)
    m2, o2, s2, _ = setup(compile=True, accum=1)
    l1 = run(s1, m1, o1, data)
    l2 = run(s2, m2, o2, [b.reshape(1, 8, 17) for b in data])
    assert np.allclose(l1, l2, rtol=1e-5), (l1, l2)


def test_overfits_a_tiny_corpus(setup):
    model, opt, step, _ = setup(compile=True, accum=1, learning_rate=1e-2, max_steps=60)
    data = batches(1, accum=1) * 60
    losses = run(step, model, opt, data)
    assert losses[-1] < 0.25 * losses[0], losses


def test_every_parameter_moves(setup):
    model, opt, step, _ = setup(compile=True)
    before = dict(tree_flatten(model.parameters()))
    run(step, model, opt, batches(1))
    after = dict(tree_flatten(model.parameters()))
    frozen = [k for k in before if mx.array_equal(before[k], after[k])]
    assert not frozen, frozen


def test_non_finite_step_is_skipped(setup):
    model, opt, step, _ = setup(compile=True)
    run(step, model, opt, batches(2))
    params = dict(tree_flatten(model.parameters()))
    state = dict(tree_flatten(opt.state))
    # poison one weight so the loss is NaN, then restore it after the step
    w = model.model.layers[0].mlp.up_proj.weight
    model.model.layers[0].mlp.up_proj.weight = mx.full(w.shape, math.nan)
    loss, gnorm, ok = step(batches(1, seed=5)[0])
    mx.eval(model.state, opt.state, loss, ok)
    assert not ok.item() and math.isnan(loss.item())
    model.model.layers[0].mlp.up_proj.weight = w
    for k, v in tree_flatten(opt.state):
        assert mx.array_equal(v, state[k]), f"optimizer state {k} changed"
    for k, v in tree_flatten(model.parameters()):
        if "up_proj" not in k or "layers.0." not in k:
            assert mx.array_equal(v, params[k]), f"parameter {k} changed"
    # and training continues normally afterwards
    loss, _, ok = step(batches(1, seed=6)[0])
    mx.eval(loss, ok)
    assert ok.item() and math.isfinite(loss.item())


def test_schedule_warmup_and_floor():
    cfg = TrainingConfig(
        learning_rate=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1
    )
    lr = lr_schedule(cfg)
    values = [lr(mx.array(s)).item() for s in range(0, 120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55, abs=1e-4)  # half way down the cosine
    assert values[110] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)
    assert all(a >= b - 1e-7 for a, b in zip(values[10:], values[11:]))


def test_weight_decay_mask(setup):
    model, *_ = setup(compile=False)
    mask = dict(tree_flatten(decay_mask(model, decay_embeddings=False)))
    assert mask["model.layers.0.self_attn.q_proj.weight"] is True
    assert mask["model.layers.0.input_layernorm.weight"] is False
    assert mask["model.embed_tokens.weight"] is False
    assert (
        dict(tree_flatten(decay_mask(model, True)))["model.embed_tokens.weight"] is True
    )


def test_decay_applies_only_to_masked(setup):
    """With zero gradients Adam's update is 0, so only decayed weights shrink."""
    model, opt, *_ = setup(compile=False, weight_decay=0.5)
    before = dict(tree_flatten(model.parameters()))
    grads = {k: mx.zeros_like(v) for k, v in before.items()}
    from mlx.utils import tree_unflatten

    opt.update(model, tree_unflatten(list(grads.items())))
    after = dict(tree_flatten(model.parameters()))
    assert mx.array_equal(
        after["model.embed_tokens.weight"], before["model.embed_tokens.weight"]
    )
    assert mx.array_equal(after["model.norm.weight"], before["model.norm.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert mx.allclose(after[q], before[q] * (1 - 0.5 * opt.learning_rate.item()))


def test_accumulation_does_not_multiply_memory(tiny_config):
    """Micro-batches run one after another inside the compiled step: peak memory of
    4 x 8 sequences stays near that of 1 x 8, far below 1 x 32."""

    def peak(batch_size, accum):
        training = dict(batch_size=batch_size, grad_accum_steps=accum)
        cfg = tiny_config(training, vocab_size=256, d_model=64, n_kv_heads=None,
                          context_length=256)  # fmt: skip
        model = Model(cfg.model)
        opt = build_optimizer(model, cfg.training)
        step = make_train_step(model, opt, cfg.training)
        batch = mx.random.randint(0, 256, (accum, batch_size, 257))
        mx.eval(model.state, opt.state, batch)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        loss, _, _ = step(batch)
        mx.eval(model.state, opt.state, loss)
        return mx.get_peak_memory() - base

    one, four, big = peak(8, 1), peak(8, 4), peak(32, 1)
    assert four < 1.5 * one and big > 2.5 * one, (one, four, big)


def test_bf16_compute_keeps_fp32_master_weights(setup):
    """The GPU precision policy, forced on CPU: bf16 forward/backward, fp32 params and
    optimizer state, and a loss close to the fp32 step's."""
    data = batches(3)
    m32, o32, s32, cfg = setup(compile=True)
    m16, o16, _, _ = setup(compile=True)
    s16 = make_train_step(m16, o16, cfg.training, compute_dtype=mx.bfloat16)
    l32, l16 = run(s32, m32, o32, data), run(s16, m16, o16, data)
    assert np.allclose(l32, l16, rtol=2e-2), (l32, l16)
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(m16.parameters()))
    assert all(v.dtype == mx.float32 for k, v in tree_flatten(o16.state) if k != "step")
    assert l16 != l32  # it really ran in bf16


def test_keep_step_buffers_caches_what_a_step_freed():
    big = 24 * 2**20  # floats: 96 MiB, more than the CPU allocator's default cache

    def work():
        x = mx.ones((big,)) * 2.0
        mx.eval(x.sum())

    previous = mx.set_cache_limit(32 * 2**20)
    try:
        mx.clear_cache()
        mx.reset_peak_memory()
        work()
        assert mx.get_cache_memory() < 4 * big  # freed buffers went back to the OS
        keep_step_buffers()  # the limit becomes the step's peak (>= 2 x 96 MiB)
        work()
        assert mx.get_cache_memory() >= 4 * big  # now kept for the next step
        mx.set_cache_limit(2**40)
        keep_step_buffers()  # a larger limit (GPU backends' default) is kept
        assert mx.set_cache_limit(previous) == 2**40
    finally:
        mx.set_cache_limit(previous)
        mx.clear_cache()


def test_cpu_evaluation_order_is_wide():
    """The execution policy widens MLX's evaluation order on the CPU (read at the
    first eval) unless the user set it; GPU backends keep MLX's default. Importing
    the step sets nothing (entry points call configure_process; the trainer's
    log says what it runs with: tests/test_train.py). See BFS_WIDTH_VAR."""
    setup = "import src.backend.policy as p; p.configure_process()"
    code = f"import os, src.train.step; {{}}; print(os.environ.get('{BFS_WIDTH_VAR}'))"
    env = {k: v for k, v in os.environ.items() if k != BFS_WIDTH_VAR}

    def run(env, s=setup):
        argv = [sys.executable, "-c", code.format(s)]
        out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    on_cpu = mx.default_device().type == mx.DeviceType.cpu
    assert run(env).strip() == (BFS_WIDTH if on_cpu else "None")
    assert run({**env, BFS_WIDTH_VAR: "7"}).strip() == "7"
    assert run(env, "pass").strip() == "None"  # no side effect on import
