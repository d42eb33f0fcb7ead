"""Local/global attention (model.sliding_window, model.global_every): the one mask
builder against an explicit loop, the blocked CPU attention that skips keys
outside the window (counted), the rotating KV cache (memory, exactness against a
full recompute across many wraps, padded rows, the compiled decode step), the
chat's cache trim, the config rules and a preset trained end to end. The option
also runs through the shared option lists of tests/test_model_options.py
(shapes, compiled == eager), tests/test_generate.py (cached == uncached) and
tests/test_convert.py (the PyTorch reference)."""

import mlx.core as mx
import numpy as np
import pytest
from commands import ROOT, run, user_error

from src.backend import kernels
from src.config import load_config
from src.inference.cache import KVCache, RotatingKVCache, make_cache
from src.inference.generate import Decoder, generate_step, prefill
from src.inference.sampling import Sampling
from src.model.masks import CAUSAL, attention_mask, ring_mask
from src.model.transformer import Model


def diff(a, b) -> str:
    d = np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32))
    return f"max {d.max():.3g} mean {d.mean():.3g}"


def loop_mask(L, offset, keys, window, pad=None, rows=1):
    """The rule spelled out: query at offset + i sees key j iff j <= its position,
    j > position - window, and j is not padding (unless j is the query itself)."""
    out = np.zeros((rows, 1, L, keys), bool)
    for b in range(rows):
        for i in range(L):
            q = offset + i
            for j in range(keys):
                ok = j <= q and (window is None or j > q - window)
                if pad is not None and j < pad[b] and j != q:
                    ok = False
                out[b, 0, i, j] = ok
    return out


@pytest.mark.parametrize(
    "L, offset, keys, window, pad",
    [
        (6, 0, 6, 3, None),
        (4, 5, 9, 2, None),
        (1, 7, 8, 3, None),
        (5, 2, 7, 4, [0, 3]),
        (3, 0, 3, 8, None),  # the window covers every key: plain causal
    ],
)
def test_mask_builder_matches_the_rule(L, offset, keys, window, pad):
    mask = attention_mask(L, offset, keys, mx.array(pad) if pad else None, window)
    want = loop_mask(L, offset, keys, window, pad, 2 if pad else 1)
    if mask == CAUSAL:
        assert window >= keys and offset == 0 and pad is None
        want_causal = loop_mask(L, offset, keys, None)
        assert (want == want_causal).all()
        return
    got = np.broadcast_to(np.array(mask), want.shape)
    assert (got == want).all(), (got.astype(int), want.astype(int))


@pytest.mark.parametrize("offset", [0, 2, 4, 5, 9, 23])
def test_ring_mask_knows_which_slot_holds_what(offset):
    """Slot j of a W-slot ring holds the latest position p = j (mod W), p <= offset:
    visible iff written and not padding."""
    W, pad = 5, [0, 3]
    got = np.array(ring_mask(mx.array(offset), W, mx.array(pad)))
    for b in range(2):
        for j in range(W):
            p = max((q for q in range(offset + 1) if q % W == j), default=-1)
            want = p >= 0 and (p >= pad[b] or p == offset)
            assert got[b, 0, 0, j] == want, (b, j, p)


def test_blocked_attention_skips_keys_outside_the_window(monkeypatch):
    """Portable attention over L=640 queries, window 64: equal to the dense masked
    computation and to the fused kernel; each block of 128 queries reads at most
    64 + 127 keys, so the work is O(L * (W + block)), not O(L^2)."""
    L, W = 640, 64
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((1, 4, L, 8)), dtype=mx.float32)
               for _ in range(3))  # fmt: skip
    mask = attention_mask(L, window=W)
    kernels.set_kernel_set("portable")
    try:
        dense = kernels._attention(q, k, v, 8**-0.5, mask)
        seen = []
        inner = kernels._attention

        def counting(qs, ks, vs, scale, m):
            seen.append(ks.shape[2])
            return inner(qs, ks, vs, scale, m)

        monkeypatch.setattr(kernels, "_attention", counting)
        blocked = kernels.attention(q, k, v, 8**-0.5, mask, W)
        monkeypatch.undo()
        kernels.set_kernel_set("fused")
        fused = kernels.attention(q, k, v, 8**-0.5, mask, W)
    finally:
        kernels.set_kernel_set(None)
    assert mx.allclose(blocked, dense, atol=1e-5), diff(blocked, dense)
    assert mx.allclose(fused, dense, atol=1e-5), diff(fused, dense)
    block = kernels.CAUSAL_BLOCK
    assert len(seen) == L // block
    assert max(seen) <= W + block - 1, seen
    assert sum(seen) < L * L / 4  # dense causal would read L^2 / 2


@pytest.fixture(params=["portable", "fused"])
def kernel_set(request):
    kernels.set_kernel_set(request.param)
    yield request.param
    kernels.set_kernel_set(None)


def local_model(tiny_config, seed=0, **kw):
    mx.random.seed(seed)
    opts = dict(context_length=96, sliding_window=5, global_every=3, n_layers=3,
                init_std=0.1) | kw  # fmt: skip
    return Model(tiny_config(**opts).model)


def test_rotating_cache_is_exact_across_many_wraps(kernel_set, tiny_config):
    """Prefill chunks shorter and longer than the window, single steps, eager and
    compiled decode: every position's logits equal a full recompute, while the
    local layers keep only W positions (their memory does not grow)."""
    model = local_model(tiny_config)
    seq = mx.array(np.random.default_rng(1).integers(0, 97, (2, 90)))
    full = model(seq)
    cache = make_cache(model)
    kinds = [type(c) for c in cache]
    assert kinds == [RotatingKVCache, RotatingKVCache, KVCache]
    got = [model(seq[:, :3], cache=cache)]  # fills part of the ring
    got += [model(seq[:, t : t + 1], cache=cache) for t in range(3, 12)]
    got.append(model(seq[:, 12:30], cache=cache))  # a chunk past the window
    got += [model(seq[:, t : t + 1], cache=cache) for t in range(30, 40)]
    got = mx.concatenate(got, axis=1)
    assert mx.allclose(got, full[:, :40], atol=2e-5), diff(got, full[:, :40])
    decoder = Decoder(model, bucket=16)
    for t in range(40, 90):
        step = decoder(seq[:, t : t + 1], cache)
        assert mx.allclose(step, full[:, t], atol=2e-5), (t, diff(step, full[:, t]))
    assert [c.keys.shape[2] for c in cache] == [5, 5, 96]
    assert all(c.offset == 90 for c in cache)


def test_generation_with_a_ring_equals_recomputing(tiny_config):
    """Sampled tokens (temperature 1, fixed seed) through the compiled decoder,
    the eager cached steps and the cache-free recompute are the same."""
    model = local_model(tiny_config, seed=3)
    prompt = mx.array([[5, 17, 3, 44, 9, 60, 2]])
    s = Sampling(temperature=1.0, seed=11, max_tokens=40)
    runs = [
        [y.item() for y in generate_step(model, prompt, s, cache, compiled=c)]
        for cache, c in [
            (make_cache(model), True),
            (make_cache(model), False),
            (None, True),
        ]  # fmt: skip
    ]
    assert runs[0] == runs[1] == runs[2]
    assert len(set(runs[0])) > 5  # a sampled run, not one repeated token


def test_padded_rows_with_a_ring_compute_what_they_would_alone(tiny_config):
    model = local_model(tiny_config)
    rows = [[5, 17, 3], [4, 8, 15, 16, 23, 42, 7, 1, 2], [9, 9, 1, 2, 3]]
    pads = [9 - len(r) for r in rows]
    batch = mx.array([[0] * p + r for p, r in zip(pads, rows)])
    forced = mx.array(np.random.default_rng(2).integers(0, 97, (3, 12)))
    for compiled in (True, False):
        cache = make_cache(model, mx.array(pads))
        got = [prefill(model, batch, cache, 4)]
        decoder = Decoder(model) if compiled else None
        for t in range(12):
            x = forced[:, t : t + 1]
            got.append(decoder(x, cache) if decoder else model(x, cache=cache)[:, -1])
        for r, row in enumerate(rows):
            alone = model(mx.concatenate([mx.array(row), forced[r]])[None])[0]
            want, mine = alone[len(row) - 1 :], mx.stack([g[r] for g in got])
            assert mx.allclose(mine, want, atol=2e-5), (compiled, r, diff(mine, want))


def test_ring_trims_only_what_it_still_holds(tiny_config):
    model = local_model(tiny_config)
    cache = make_cache(model)
    model(mx.array([[1, 2, 3, 4]]), cache=cache)
    assert cache[0].trim(2) == 2 and cache[0].offset == 2  # nothing overwritten
    model(mx.array([[1, 2, 3, 4, 5, 6]]), cache=make_cache(model))
    ring = make_cache(model)
    model(mx.array([[1, 2, 3, 4, 5, 6, 7]]), cache=ring)
    assert ring[0].trim(2) == 0 and ring[0].offset == 7  # 7 > W=5: refill instead


def test_kv_cache_memory_of_local_layers(tiny_config):
    """At a 2,048-token context, 3 of 4 layers local with W=64: the cache holds
    3 * 64 + 2048 positions per kv head instead of 4 * 2048."""
    model = local_model(
        tiny_config, context_length=2048, sliding_window=64, global_every=4,
        n_layers=4,
    )  # fmt: skip
    cache = make_cache(model)
    prefill(model, mx.array([[1] * 300]), cache, 128)
    sizes = [c.keys.shape[2] for c in cache]
    assert sizes == [64, 64, 64, 2048]
    nbytes = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    assert nbytes == (3 * 64 + 2048) * 2 * 2 * 8 * 4  # positions*k,v*heads*hd*fp32


def test_config_rules_through_the_cli():
    for sets, words in [
        (["model.sliding_window=64", "model.context_length=64"], "must be below"),
        (["model.sliding_window=-1"], "model.sliding_window=-1"),
        (["model.sliding_window=8", "model.global_every=0"], "model.global_every=0"),
    ]:
        args = [a for s in sets for a in ("--set", s)]
        user_error(run("train", "--config", "configs/tiny.yaml", *args), *words)


def test_preset_layer_pattern():
    m = load_config(ROOT / "configs" / "local-global.yaml").model
    windows = [m.layer_window(i) for i in range(m.n_layers)]
    assert windows == [64, 64, None, 64, 64, None]


def test_local_global_preset_trains_and_generates(tmp_path, tiny_dataset):
    """configs/local-global.yaml, shrunk, trains end to end and its checkpoint
    generates through the CLI."""
    sets = {
        "data.train_path": tiny_dataset["train"],
        "data.val_path": tiny_dataset["val"],
        "data.tokenizer_path": tiny_dataset["tokenizer"],
        "checkpoint.dir": tmp_path / "ck",
        "logging.dir": tmp_path / "logs",
        "logging.progress_bar": "false",
        "model.vocab_size": 512,
        "model.d_model": 48,
        "model.context_length": 96,
        "model.sliding_window": 16,
        "training.max_steps": 6,
        "training.batch_size": 2,
        "training.warmup_steps": 1,
        "eval.interval": 3,
        "eval.max_tokens": 512,
        "eval.sample_tokens": 8,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = run("train", "--config", "configs/local-global.yaml", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = tmp_path / "ck" / "local-global" / "latest"
    gen = run("inference", "--checkpoint", final, "--prompt", "Once upon a time",
              "--max-tokens", "20", "--seed", "1")  # fmt: skip
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-2000:]


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_chat_turns_keep_the_ring_exact(tiny_dataset, tiny_config, template):
    """REPL conversations on a local/global model: after every turn the cache
    still gives a full recompute's next-token logits. A stop string cuts every
    reply inside what was fed, so the cache must forget tokens: a ring that has
    wrapped cannot, and is refilled."""
    import io

    from src.inference.chat import Chat
    from src.template import CHAT, PLAIN
    from src.tokenizer.kinds import load_tokenizer

    tok = load_tokenizer(tiny_dataset["tokenizer"])
    model = local_model(tiny_config, vocab_size=512, context_length=160)
    s = Sampling(temperature=0.8, seed=3, max_tokens=12, stop=["e"])
    chat = Chat(model, tok, s, CHAT if template == "chat" else PLAIN, io.StringIO())
    for text in ("Hello there", "Tell me a story", "about a dog", "and a cat"):
        chat.say(text)
        off = chat.cache[0].offset
        assert all(c.offset == off for c in chat.cache)
        assert chat.tokens[off:], "nothing left to feed"
        cached = model(mx.array([chat.tokens[off:]]), cache=chat.cache)[:, -1]
        full = model(mx.array([chat.tokens]))[:, -1]
        assert mx.allclose(cached, full, atol=1e-4), diff(cached, full)


def _local_checkpoint(tmp_path, tiny_dataset, tiny_config, **opts):
    """A checkpoint of a 2-layer model, layer 0 local (window 8), random weights."""
    from mlx.utils import tree_flatten

    from src.checkpoint import store
    from src.checkpoint.contents import build_meta
    from src.tokenizer.spm import Tokenizer

    cfg = tiny_config(vocab_size=512, d_model=64, context_length=64, init_std=0.15,
                      sliding_window=8, global_every=2, tie_embeddings=False,
                      **opts)  # fmt: skip
    mx.random.seed(0)
    weights = dict(tree_flatten(Model(cfg.model).parameters()))
    tok = tiny_dataset["tokenizer"]
    meta = build_meta(cfg, Tokenizer.load(tok).sha256)
    return store.save_checkpoint(tmp_path / "run", 7, weights, {}, meta, tok)


def test_local_global_exports_as_qwen3_layer_types_and_imports_back(
    tmp_path, tiny_dataset, tiny_config
):
    """QK-norm + sliding window is Qwen3 with per-layer types: transformers gives
    our logits over 48 tokens (6 windows), and --from hf gives the option back,
    weights bit for bit."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import json

    from src.checkpoint.contents import load_model

    path = _local_checkpoint(tmp_path, tiny_dataset, tiny_config, qk_norm=True)
    out = tmp_path / "hf"
    proc = run("convert", "--checkpoint", path, "--to", "hf", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "mlx-lm" in proc.stderr  # warns: mlx-lm's qwen3 attends globally
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["sliding_window"] == 8
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    card = (out / "README.md").read_text()
    assert "| type | `qwen3` (Qwen3ForCausalLM) |" in card
    assert "| sliding window | 8 tokens in 1 of 2 layers (`layer_types`) |" in card
    model, _, _ = load_model(path)
    ids = np.random.default_rng(1).integers(0, 512, 48).tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf.eval()(torch.tensor([ids])).logits.numpy()
    ours = np.array(model(mx.array([ids])))
    assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()
    conf = transformers.AutoConfig.from_pretrained(out)
    conf.layer_types = ["full_attention"] * 2
    global_only = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, config=conf
    )
    with torch.no_grad():
        other = global_only.eval()(torch.tensor([ids])).logits.numpy()
    assert np.abs(ours - other).max() > 1e-3  # the window is what makes them agree
    proc = run("convert", "--from", "hf", out, "--out", tmp_path / "back")
    assert proc.returncode == 0, proc.stderr
    back, _, _ = load_model(tmp_path / "back" / "latest")
    m = back.config
    assert (m.sliding_window, m.global_every, m.qk_norm) == (8, 2, True)
    assert mx.array_equal(back(mx.array([ids])), model(mx.array([ids])))


def test_local_global_without_qk_norm_is_refused_by_hf_export(
    tmp_path, tiny_dataset, tiny_config
):
    path = _local_checkpoint(tmp_path, tiny_dataset, tiny_config)
    proc = run("convert", "--checkpoint", path, "--to", "hf", "--out", tmp_path / "o")
    user_error(proc, "model.sliding_window=8", "qk_norm")
    assert not (tmp_path / "o").exists()
    pt = tmp_path / "m.pt"
    assert (
        run("convert", "--checkpoint", path, "--to", "torch", "--out", pt).returncode
        == 0
    )


@pytest.mark.parametrize(
    "edits, want",
    [
        ({"layer_types": ["sliding_attention", "full_attention"] * 2}, (16, 2)),
        ({"layer_types": ["sliding_attention"] * 3 + ["full_attention"]}, (16, 4)),
        ({"layer_types": ["full_attention"] * 4}, (0, 4)),
        ({"max_window_layers": 4}, (0, 4)),  # transformers' default types
        ({"layer_types": ["full_attention", "sliding_attention"] * 2}, "layer_types="),
        ({"layer_types": ["sliding_attention"] * 4}, "layer_types="),
        ({"layer_types": ["full_attention"]}, "expected one per layer"),
        ({"max_window_layers": 1}, "layer_types="),  # [full, sliding, sliding, sliding]
        ({"model_type": "llama"}, "use_sliding_window=true"),
        ({"sliding_window": 0}, "sliding_window=0"),
    ],
)
def test_hf_window_configs_import_or_are_refused(edits, want):
    """A Qwen3 config.json with sliding windows imports when its layer types are
    our pattern (every K-th layer and the last global), and is refused naming the
    key otherwise."""
    from src.checkpoint.hf_folder import model_config_from_hf
    from src.errors import ConvertError

    c = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32,
         "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 96,
         "use_sliding_window": True, "sliding_window": 16} | edits  # fmt: skip
    if isinstance(want, str):
        with pytest.raises(ConvertError, match=want.replace("[", r"\[")):
            model_config_from_hf(c)
        return
    m = model_config_from_hf(c)
    assert (m.sliding_window, m.global_every) == want


def test_memory_estimate_counts_the_window(tiny_config):
    """The estimate's attention scores: L x (W + block) for a local layer, L x L
    for a global one (its block size is the kernel's)."""
    from src.train import memory

    assert memory.CAUSAL_BLOCK == kernels.CAUSAL_BLOCK
    est = memory.estimate_training_memory
    local = tiny_config(context_length=1024, sliding_window=64, global_every=2).model
    full = tiny_config(context_length=1024).model
    per_score = 4 * 4 * 1024 * 2  # bytes_per_act * heads * L * (scores + probs)
    assert est(full, 2) - est(local, 2) == 2 * per_score * (1024 - (64 + 128))
