"""Local/global attention against global attention everywhere, same weights shape,
in one run: training tokens/s at a long context, decode tokens/s deep into a
2,048-token context, and the KV cache's memory.

    python scripts/bench_local_global.py [--config speedrun] [--window 64]
        [--global-every 4] [--train-context 1024] [--context 2048] [--repeats 3]

Rows: `global` (model.sliding_window 0, today's model) and `local/global`
(--window, --global-every); everything else is the config's. Training: the
compiled step (AdamW, fp32, batch --batch) on random tokens, median seconds per
step over --steps steps after a warm-up. Decode: a --prompt-token prompt
prefilled, then --new greedy tokens through the compiled decoder, tokens/s of the
decode (median of --repeats); the cache bytes are those its layers hold at the
end. Ratios are local/global over global, measured in the same run.
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

from src.backend import kernels  # noqa: E402
from src.backend.machine import describe, summary  # noqa: E402
from src.config import TrainingConfig, load_config  # noqa: E402
from src.inference.cache import make_cache  # noqa: E402
from src.inference.generate import generate_step  # noqa: E402
from src.inference.sampling import Sampling  # noqa: E402
from src.model.masks import attention_mask  # noqa: E402
from src.model.transformer import Model  # noqa: E402
from src.train.optim import build_optimizer  # noqa: E402
from src.train.step import make_train_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train_tps(cfg, batch: int, steps: int) -> tuple[float, float]:
    """(median tokens/s, peak MiB) of the compiled training step."""
    mx.random.seed(0)
    model = Model(cfg)
    t = TrainingConfig(batch_size=batch, warmup_steps=1)
    opt = build_optimizer(model, t)
    step = make_train_step(model, opt, t)
    x = mx.random.randint(0, cfg.vocab_size, (1, batch, cfg.context_length + 1))
    for _ in range(2):  # compile, then one more for the allocator's caches
        mx.eval(step(x), model.state, opt.state)
    mx.reset_peak_memory()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        mx.eval(step(x), model.state, opt.state)
        times.append(time.perf_counter() - t0)
    return batch * cfg.context_length / statistics.median(times), (
        mx.get_peak_memory() / 2**20
    )


def attention_ms(L: int, window: int | None, heads: int, kv: int, hd: int) -> float:
    """Median ms of one attention forward over L queries (batch 1), causal or
    windowed, with the kernel set in use (portable on the CPU backend)."""
    rng = mx.random.key(0)
    q = mx.random.normal((1, heads, L, hd), key=rng)
    k, v = mx.random.normal((2, 1, kv, L, hd), key=rng)
    mask = attention_mask(L, window=window)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        mx.eval(kernels.attention(q, k, v, hd**-0.5, mask, window))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])


def decode_tps(model, prompt: list[int], new: int) -> tuple[float, int]:
    """(decode tokens/s, cache bytes at the end)."""
    s = Sampling(temperature=0, max_tokens=new)
    cache = make_cache(model)
    steps = generate_step(model, mx.array([prompt]), s, cache)
    for n, _ in enumerate(steps):
        if n == 0:
            t1 = time.perf_counter()
    rate = (new - 1) / (time.perf_counter() - t1)
    return rate, sum(c.keys.nbytes + c.values.nbytes for c in cache)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="speedrun", help="a configs/ name")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--global-every", type=int, default=4)
    p.add_argument("--train-context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=1800, help="prompt tokens")
    p.add_argument("--new", type=int, default=200, help="decoded tokens")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    base = load_config(ROOT / "configs" / f"{args.config}.yaml").model
    rows = {
        "global": dict(sliding_window=0),
        "local/global": dict(
            sliding_window=args.window, global_every=args.global_every
        ),
    }
    print(f"machine: {summary(describe())}")
    print(
        f"config {args.config}: d {base.d_model}, {base.n_layers} layers, "
        f"{base.n_heads} heads ({base.kv_heads} kv); window {args.window}, every "
        f"{args.global_every}th layer and the last global"
    )
    results = {}
    for name, opts in rows.items():
        cfg = replace(base, context_length=args.train_context, **opts)
        tps, peak = train_tps(cfg, args.batch, args.steps)
        cfg = replace(base, context_length=args.context, **opts)
        mx.random.seed(0)
        model = Model(cfg)
        model.eval()
        prompt = mx.random.randint(0, cfg.vocab_size, (args.prompt,)).tolist()
        decode_tps(model, prompt, args.new)  # traces every window of the decoder
        runs = [decode_tps(model, prompt, args.new) for _ in range(args.repeats)]
        rate = statistics.median(r[0] for r in runs)
        results[name] = (tps, peak, rate, runs[0][1] / 2**20)
        windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
        print(f"{name}: layer windows {windows}", flush=True)
    print()
    print(
        f"| attention | train tok/s (ctx {args.train_context}, batch {args.batch}) "
        f"| train peak MiB | decode tok/s (at {args.prompt}-{args.prompt + args.new}"
        f" of {args.context}) | KV cache MiB |"
    )
    print("|---|---|---|---|---|")
    for name, (tps, peak, rate, kv) in results.items():
        print(f"| {name} | {tps:,.0f} | {peak:,.0f} | {rate:,.0f} | {kv:,.2f} |")
    L, hd = args.train_context, base.head_dim
    full = attention_ms(L, None, base.n_heads, base.kv_heads, hd)
    local = attention_ms(L, args.window, base.n_heads, base.kv_heads, hd)
    print(
        f"\none attention layer's forward, {L} queries ({kernels.kernel_set()} "
        f"kernels): causal {full:.2f} ms, window {args.window} {local:.2f} ms "
        f"({full / local:.2f}x less time)"
    )
    (g, lg) = results["global"], results["local/global"]
    print(
        f"\nlocal/global vs global: train {lg[0] / g[0]:.2f}x tokens/s, peak "
        f"{lg[1] / g[1]:.2f}x; decode {lg[2] / g[2]:.2f}x tokens/s; KV cache "
        f"{lg[3] / g[3]:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
