"""Generation speed: our engine vs mlx-lm's `stream_generate`, same shapes and weights.

    python scripts/bench_generate.py [--configs tiny model_config_small] [--new 200]

For each config: a model with random weights (the context raised to 1,280 so a
1,000-token prompt fits; no weight depends on it), loaded strictly into
`mlx_lm.models.llama.Model` (the names match), checked to give the same logits.
Then, at batch 1, greedy: decode tokens/s with a 32-token prompt and `--new` new
tokens (both sides detokenize every token with the same toy tokenizer), prefill
tokens/s of a 1,000-token prompt, and our batch-8 throughput. Median of `--repeats`
runs, taken in turns (ours, theirs, ours, ...), warm-up excluded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import src  # noqa: F401,E402  (loads the optimized BLAS; must precede mlx)

# isort: split
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.generate import stream_generate  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.tokenizer_utils import (  # noqa: E402
    NaiveStreamingDetokenizer,
    TokenizerWrapper,
)

from src.config import load_config  # noqa: E402
from src.inference.cache import make_cache  # noqa: E402
from src.inference.generate import generate_step  # noqa: E402
from src.inference.sampling import Sampling  # noqa: E402
from src.inference.streaming import TextStreamer  # noqa: E402
from src.model.transformer import Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class ToyTokenizer:
    """Enough of a tokenizer for both detokenizers: id -> a letter."""

    eos_token_id = None

    def decode(self, ids, **_):
        return "".join(chr(97 + i % 26) for i in ids)

    def encode(self, text, **_):
        return [ord(c) % 26 for c in text]


def wrap_for_mlx_lm(tok) -> TokenizerWrapper:
    # stream_generate only reads `detokenizer` and `eos_token_ids`.
    w = TokenizerWrapper.__new__(TokenizerWrapper)
    w._tokenizer, w._detokenizer = tok, NaiveStreamingDetokenizer(tok)
    w._eos_token_ids = set()  # never stop early: time exactly `new` tokens
    return w


def models(config: str, context: int):
    cfg = replace(load_config(ROOT / "configs" / f"{config}.yaml").model)
    cfg = replace(cfg, context_length=context, dropout=0.0)
    ours = Model(cfg)
    ours.eval()
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        intermediate_size=cfg.ffn_dim,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        vocab_size=cfg.vocab_size,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    theirs = llama.Model(args)
    theirs.load_weights(tree_flatten(ours.parameters()), strict=True)
    mx.eval(ours.parameters(), theirs.parameters())
    x = mx.random.randint(0, cfg.vocab_size, (1, 48))
    err = mx.abs(ours(x) - theirs(x)).max().item()
    assert err < 1e-4, f"logits differ by {err}: not the same model"
    return ours, theirs, cfg


def ours_decode(model, tok, prompt, new, batch=1, compiled=True) -> tuple[float, float]:
    """(decode tokens/s over all rows, prefill tokens/s); `compiled=False` runs
    the eager decode step (the reference the compiled one is tested against)."""
    s = Sampling(temperature=0, max_tokens=new)
    streamers = [TextStreamer(tok) for _ in range(batch)]
    x = mx.array([prompt] * batch)
    t0 = time.perf_counter()
    steps = generate_step(model, x, s, make_cache(model), compiled=compiled)
    for n, y in enumerate(steps):
        for st, t in zip(streamers, y.tolist()):
            st.add(t)
        if n == 0:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    return batch * (new - 1) / (t2 - t1), batch * len(prompt) / (t1 - t0)


def theirs_decode(model, tok, prompt, new) -> tuple[float, float]:
    t0 = time.perf_counter()
    for n, r in enumerate(stream_generate(model, tok, mx.array(prompt), new)):
        _ = r.text
        if n == 0:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    assert r.generation_tokens == new
    return (new - 1) / (t2 - t1), len(prompt) / (t1 - t0)


def medians(*runs, repeats: int) -> list[float]:
    """Median of `repeats` calls of each function, taken in turns (so all see the
    same machine load); a call returns a number or a (decode, prefill) pair of
    which the first counts."""
    first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731
    got = [[first(run()) for run in runs] for _ in range(repeats)]
    return [statistics.median(g[i] for g in got) for i in range(len(runs))]


def bench(name: str, new: int, repeats: int, tok: ToyTokenizer) -> None:
    ours, theirs, cfg = models(name, context=1280)
    short = mx.random.randint(0, cfg.vocab_size, (32,)).tolist()
    long = mx.random.randint(0, cfg.vocab_size, (1000,)).tolist()
    wrapped = wrap_for_mlx_lm(tok)
    ours_decode(ours, tok, short, 8), theirs_decode(theirs, wrapped, short, 8)
    ours_decode(ours, tok, short, new)  # traces the compiled step's windows
    o, t, eager = medians(
        lambda: ours_decode(ours, tok, short, new),
        lambda: theirs_decode(theirs, wrapped, short, new),
        lambda: ours_decode(ours, tok, short, new, compiled=False),
        repeats=repeats,
    )
    pre_o, pre_t = medians(
        lambda: ours_decode(ours, tok, long, 2)[1],
        lambda: theirs_decode(theirs, wrapped, long, 2)[1],
        repeats=repeats,
    )
    b1, b8 = medians(
        lambda: ours_decode(ours, tok, short, new),
        lambda: ours_decode(ours, tok, short, new, batch=8),
        repeats=repeats,
    )
    params = ours.num_params() / 1e6
    print(f"\n{name} (d={cfg.d_model}, layers={cfg.n_layers}, vocab={cfg.vocab_size}, "
          f"{params:.1f}M params)")  # fmt: skip
    print(f"  decode tok/s   ours {o:8,.0f}   mlx-lm {t:8,.0f}   ratio {o / t:.2f}x "
          f"(ours with the eager step: {eager:,.0f}, {eager / t:.2f}x)")  # fmt: skip
    print(f"  prefill tok/s  ours {pre_o:8,.0f}   mlx-lm {pre_t:8,.0f}   ratio "
          f"{pre_o / pre_t:.2f}x (1,000-token prompt)")  # fmt: skip
    print(f"  batch 8 decode ours {b8:8,.0f} tok/s in all = {b8 / b1:.1f}x batch 1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "model_config_small"])
    p.add_argument("--new", type=int, default=200, help="new tokens per run")
    p.add_argument("--repeats", type=int, default=3, help="median of N runs")
    args = p.parse_args(argv)
    mx.random.seed(0)
    tok = ToyTokenizer()
    print(
        f"device: {mx.default_device()}; decode at batch 1, greedy, median of "
        f"{args.repeats}"
    )
    for name in args.configs:
        bench(name, args.new, args.repeats, tok)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
