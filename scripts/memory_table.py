"""Measure peak memory and step speed of the training step for config presets.

    python scripts/memory_table.py configs/quickstart.yaml configs/model_config_small.yaml
    python scripts/memory_table.py configs/large.yaml --batch-size 1 --accum 1 --steps 1

Builds the model and optimizer, runs the compiled training step on random tokens
(warm-up excluded), and prints a markdown table: parameters, batch, context,
measured peak memory (mx.get_peak_memory), the trainer's estimate, median step
time and tokens/s. Nothing is read from or written to disk.
"""

from __future__ import annotations

import argparse
import statistics
import time

import src  # noqa: F401  (loads the optimized BLAS; must precede mlx)

# isort: split
import mlx.core as mx

from src.backend import blas, policy
from src.cli import fmt_bytes
from src.config import load_config
from src.train.assembly import assemble


def measure(
    path: str, batch_size: int | None, accum: int | None, steps: int, warmup: int
) -> dict:
    sets = [f"training.batch_size={batch_size}"] if batch_size else []
    sets += [f"training.grad_accum_steps={accum}"] if accum else []
    cfg = load_config(path, sets)
    m, t = cfg.model, cfg.training
    t.seed = 0
    parts = assemble(cfg, compile=True)
    model, opt, step = parts.model, parts.optimizer, parts.train_step
    batch = mx.random.randint(
        0, m.vocab_size, (t.grad_accum_steps, t.batch_size, m.context_length + 1)
    )
    mx.eval(model.state, opt.state, batch)
    mx.reset_peak_memory()
    times = []
    for i in range(warmup + steps):
        tic = time.perf_counter()
        loss, _, _ = step(batch)
        mx.eval(model.state, opt.state, loss)
        policy.keep_step_buffers()  # as the trainer does after its first step
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    tokens = t.grad_accum_steps * t.batch_size * m.context_length
    med = statistics.median(times)
    return {
        "config": path,
        "params": model.num_params(),
        "batch": f"{t.batch_size}x{t.grad_accum_steps}",
        "context": m.context_length,
        "peak": mx.get_peak_memory(),
        "estimate": parts.memory_estimate(cfg),
        "step_s": med,
        "tok_s": tokens / med,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--batch-size", type=int, help="override training.batch_size")
    p.add_argument("--accum", type=int, help="override training.grad_accum_steps")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed steps (compile, caches)"
    )
    args = p.parse_args(argv)
    policy.configure_process()
    print(f"device: {mx.default_device()}; {blas.describe()}")
    print(
        "| config | params | batch (micro x accum) | context | peak memory | estimate "
        "| step | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in args.configs:
        r = measure(path, args.batch_size, args.accum, args.steps, args.warmup)
        print(
            f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['context']} "
            f"| {fmt_bytes(r['peak'])} | {fmt_bytes(r['estimate'])} "
            f"| {r['step_s']:.2f} s | {r['tok_s']:,.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
