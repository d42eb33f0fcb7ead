"""The generation engine: cached == uncached, determinism, seeds, each sampler on a
hand-made distribution, penalties, V6 edge cases, batching, the text streamer."""

import mlx.core as mx
import numpy as np
import pytest

from src.inference.cache import make_cache
from src.inference.generate import (
    Decoder,
    generate_step,
    generate_tokens,
    prefill,
)
from src.inference.sampling import Sampling, make_processors, make_sampler
from src.inference.streaming import TextStreamer
from src.model.transformer import Model


@pytest.fixture
def make_model(tiny_config):
    """make_model(seed=0, **model options): a tiny model with context 32."""

    def make(seed: int = 0, **kw) -> Model:
        mx.random.seed(seed)
        return Model(tiny_config(**{"context_length": 32, **kw}).model)

    return make


def diff(a, b) -> str:
    d = np.abs(np.array(a, dtype=np.float32) - np.array(b, dtype=np.float32))
    return f"max {d.max():.3g} mean {d.mean():.3g}"


def run(model, prompt, s, cache=True, n=None) -> list[list[int]]:
    c = make_cache(model) if cache else None
    return [y.tolist() for y in generate_step(model, mx.array(prompt), s, c, None, n)]


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_cached_logits_equal_full_recompute(chunk, make_model):
    model = make_model(qk_norm=True)
    seq = mx.array([[5, 17, 3, 44, 9, 60, 2, 81, 33, 7, 12, 90]])
    full = model(seq)  # (1, 12, V): every position from scratch
    cache = make_cache(model)
    got = [prefill(model, seq[:, :7], cache, chunk)]
    for t in range(7, seq.shape[1]):
        got.append(model(seq[:, t : t + 1], cache=cache)[:, -1, :])
    got = mx.stack(got, axis=1)
    want = full[:, 6:, :]
    assert mx.allclose(got, want, atol=2e-5), diff(got, want)
    assert cache[0].keys.shape[2] == 32  # preallocated to the context, never grown


def test_cached_tokens_equal_uncached_with_every_knob(make_model):
    model = make_model()
    prompt = [[5, 17, 3, 44, 9]]
    knobs = Sampling(
        temperature=1.2,
        top_k=20,
        top_p=0.9,
        min_p=0.02,
        repetition_penalty=1.3,
        repetition_window=8,
        frequency_penalty=0.2,
        presence_penalty=0.1,
        seed=4,
        max_tokens=20,
    )
    for s in (Sampling(temperature=0, max_tokens=20), knobs):
        assert run(model, prompt, s) == run(model, prompt, s, cache=False)


def test_greedy_is_deterministic_and_seed_reproduces(make_model):
    model = make_model()
    greedy = Sampling(temperature=0, max_tokens=15)
    assert run(model, [[1, 2, 3]], greedy) == run(model, [[1, 2, 3]], greedy)
    a, b, c = (Sampling(temperature=1.5, seed=k, max_tokens=25) for k in (7, 7, 8))
    assert run(model, [[1, 2, 3]], a) == run(model, [[1, 2, 3]], b)
    assert run(model, [[1, 2, 3]], a) != run(model, [[1, 2, 3]], c)


def support(s: Sampling, probs, draws=4000) -> set[int]:
    """The set of tokens the sampler ever picks from `probs` (in `draws` rows)."""
    logprobs = mx.log(mx.broadcast_to(mx.array(probs), (draws, len(probs))))
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    sampler = make_sampler(s, len(probs))
    return set(np.unique(np.array(sampler(logprobs, mx.random.key(0)))).tolist())


PROBS = [0.05, 0.4, 0.1, 0.3, 0.15]  # token 1 > 3 > 4 > 2 > 0


@pytest.mark.parametrize(
    "knobs, kept",
    [
        ({"temperature": 0}, {1}),
        ({}, {0, 1, 2, 3, 4}),
        ({"top_k": 1}, {1}),
        ({"top_k": 2}, {1, 3}),
        ({"top_k": 5}, {0, 1, 2, 3, 4}),
        ({"top_k": 1000}, {0, 1, 2, 3, 4}),  # larger than the vocab: off
        ({"top_p": 0.35}, {1}),  # smallest set with mass >= top_p
        ({"top_p": 0.65}, {1, 3}),
        ({"top_p": 0.8}, {1, 3, 4}),
        ({"min_p": 0.3}, {1, 3, 4}),  # p >= 0.3 * 0.4 = 0.12
        ({"min_p": 0.5}, {1, 3}),  # p >= 0.2
        ({"top_k": 3, "min_p": 0.5}, {1, 3}),
    ],
)
def test_each_sampler_keeps_exactly_the_right_tokens(knobs, kept):
    assert support(Sampling(**{"temperature": 1.0, **knobs}).check(), PROBS) == kept


def test_penalties_touch_only_the_window():
    logits = mx.array([[2.0, -2.0, 1.0, 1.0, 0.5]])
    history = mx.array([4, 0, 1, 1])

    def apply(**kw):
        out = logits
        for proc in make_processors(Sampling(**kw)):
            out = proc(history, mx.array(out))
        return np.array(out)[0].tolist()

    assert apply() == logits.tolist()[0]
    # sign-aware: positive logits divided, negative multiplied; window = last 3
    assert apply(repetition_penalty=2.0, repetition_window=3) == [1, -4, 1, 1, 0.5]
    assert apply(presence_penalty=0.5, repetition_window=3) == [1.5, -2.5, 1, 1, 0.5]
    freq = apply(frequency_penalty=0.5, repetition_window=4)
    assert freq == [1.5, -3.0, 1, 1, 0.0]


def test_v6_edge_cases(capsys, make_model):
    model = make_model()
    assert list(generate_tokens(model, [1, 2], 0)) == []
    assert len(list(generate_tokens(model, [], 3, eos_id=None))) == 3
    s = Sampling(temperature=1.0, top_k=10_000, max_tokens=5)
    assert len(list(generate_tokens(model, [1], 5, sampling=s))) == 5
    long = list(range(90))
    assert list(generate_tokens(model, long, 5)) == []  # kept 32: context full
    assert "keeping its last 32" in capsys.readouterr().err
    out = list(generate_tokens(model, long, 5, reserve=5))  # kept 27: room for 5
    assert len(out) == 5 and "keeping its last 27" in capsys.readouterr().err
    assert list(generate_tokens(model, [1, 2], 3, temperature=0)) == list(
        generate_tokens(model, [1, 2], 3, temperature=0)
    )


def test_batch_rows_equal_single_rows(make_model):
    model = make_model()
    prompts = [[5, 17, 3], [44, 9, 60], [2, 81, 33]]
    s = Sampling(temperature=0, repetition_penalty=1.5, max_tokens=12)
    batched = np.array(run(model, prompts, s)).T.tolist()
    single = [np.array(run(model, [p], s))[:, 0].tolist() for p in prompts]
    assert batched == single


TEXTS = [
    "Once upon a time, a cat sat.\nThe end.",
    "héllo wörld: 世界 🙂🚀 — ça va? ∑x² ≠ ∞",
    "emoji only 🐶🐱🐭🐹🐰🦊🐻",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decoded_text(tiny_dataset, text):
    from src.tokenizer.spm import Tokenizer

    tok = Tokenizer.load(tiny_dataset["tokenizer"])
    ids = tok.encode(text)
    assert len(ids) > len(text) // 4
    streamer = TextStreamer(tok)
    parts = [streamer.add(t) for t in ids] + [streamer.finish()]
    assert all("\ufffd" not in p for p in parts), parts
    assert "".join(parts) == streamer.text == tok.decode(ids) == text


def test_streamer_stop_strings(tiny_dataset):
    from src.tokenizer.spm import Tokenizer

    tok = Tokenizer.load(tiny_dataset["tokenizer"])
    text = "The dog ran. The END came 🙂 after. More."
    for stop, want in [
        ("END", "The dog ran. The "),
        ("🙂", "The dog ran. The END came "),
    ]:
        streamer = TextStreamer(tok, [stop, "never here"])
        parts = []
        for t in tok.encode(text):
            parts.append(streamer.add(t))
            assert want.startswith("".join(parts))  # no piece of a stop string shown
        parts.append(streamer.finish())
        assert "".join(parts) == streamer.text == want and streamer.stopped


@pytest.fixture(params=["portable", "fused"])
def kernel_set(request):
    from src.backend import kernels

    kernels.set_kernel_set(request.param)
    yield request.param
    kernels.set_kernel_set(None)


def test_compiled_decode_equals_eager_and_full_recompute(kernel_set, make_model):
    """The compiled step (window buckets of 4, so it crosses several) gives the
    eager cached step's logits and a full recompute's, on a batch of 2."""
    model = make_model(qk_norm=True)
    seq = mx.array(np.random.default_rng(1).integers(0, 97, (2, 30)))
    full = model(seq)
    decoder, eager = Decoder(model, bucket=4), make_cache(model)
    cache = make_cache(model)
    prefill(model, seq[:, :5], cache, 100), prefill(model, seq[:, :5], eager, 100)
    for t in range(5, 30):
        got = decoder(seq[:, t : t + 1], cache)
        want = model(seq[:, t : t + 1], cache=eager)[:, -1, :]
        assert mx.allclose(got, want, atol=1e-5), (t, diff(got, want))
        assert mx.allclose(got, full[:, t], atol=2e-5), (t, diff(got, full[:, t]))
        assert cache[0].offset == eager[0].offset == t + 1
    assert sorted(decoder._steps) == [8, 12, 16, 20, 24, 28, 32]  # one trace each
    assert cache[0].keys.shape[2] == 32  # written in place, never grown


def test_padded_rows_compute_what_they_would_alone(kernel_set, make_model):
    """Left-padded rows of a batch give each row's own logits (prefill in chunks,
    then compiled and eager decode steps), and greedy decoding the same tokens."""
    model = make_model()
    rows = [[5, 17, 3], [4, 8, 15, 16, 23, 42, 7], [9, 9, 1, 2, 3]]
    pads = [7 - len(r) for r in rows]
    batch = mx.array([[0] * p + r for p, r in zip(pads, rows)])
    forced = mx.array(np.random.default_rng(2).integers(0, 97, (3, 6)))
    for compiled in (True, False):
        cache = make_cache(model, mx.array(pads))
        got = [prefill(model, batch, cache, 3)]
        for t in range(6):
            x = forced[:, t : t + 1]
            step = Decoder(model) if compiled else None
            got.append(step(x, cache) if step else model(x, cache=cache)[:, -1])
        for r, row in enumerate(rows):
            alone = model(mx.concatenate([mx.array(row), forced[r]])[None])[0]
            want = alone[len(row) - 1 :]
            mine = mx.stack([g[r] for g in got])
            assert mx.allclose(mine, want, atol=2e-5), (compiled, r, diff(mine, want))
        s = Sampling(temperature=0, max_tokens=12)
        cache = make_cache(model, mx.array(pads))
        steps = generate_step(model, batch, s, cache, None, None, compiled=compiled)
        together = np.array([y.tolist() for y in steps]).T.tolist()
        assert together == [np.array(run(model, [r], s))[:, 0].tolist() for r in rows]


MODEL_OPTIONS = {  # model.mlp / norm / norm_position / position off their defaults
    "geglu": {"mlp": "geglu"},
    "relu2": {"mlp": "relu2"},
    "layernorm": {"norm": "layernorm"},
    "no-norm": {"norm": "none"},
    "post": {"norm_position": "post"},
    "nope": {"position": "none"},
    "local-global": {"sliding_window": 4, "global_every": 2},
    "all-local": {"sliding_window": 3, "global_every": 5, "n_layers": 3},
    "all": {
        "mlp": "gelu",
        "norm": "layernorm",
        "norm_position": "post",
        "position": "none",
        "qk_norm": True,
    },  # fmt: skip
}


@pytest.mark.parametrize("opts", MODEL_OPTIONS.values(), ids=MODEL_OPTIONS.keys())
def test_cached_equals_uncached_with_model_options(opts, make_model):
    """Each model option: chunked prefill then cached steps, eager and compiled,
    give a full recompute's logits; greedy tokens equal the uncached ones."""
    model = make_model(**opts)
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
    assert run(model, [[5, 17, 3, 44, 9]], s) == run(
        model, [[5, 17, 3, 44, 9]], s, cache=False
    )
