"""Per-step cost of the gradient all-reduce in data-parallel training.

    python scripts/bench_allreduce.py [--config configs/model_config_small.yaml]
        [--batch-size 1] [--layers N] [--steps 5]

Each measurement runs in fresh processes, each with OPENBLAS_NUM_THREADS=1:
  1. one process: the trainer's compiled step (src.train.step) on a (1, B, L+1) batch;
  2. two independent processes at once, the same step each: the cost of sharing
     the machine's cores and memory bandwidth, without communication;
  3. two ranks on 127.0.0.1 (ring backend), the same per-rank batch, gradients
     averaged inside the step (`nn.average_gradients`, as the trainer does);
  4. two ranks: `nn.average_gradients` of a gradient-sized fp32 tree alone, and
     the all_sum of one int (the trainer's per-step stop flag) alone.
3 minus 2 is the per-step communication overhead.
Random weights and tokens; nothing is read from or written to disk. Prints medians
(warm-up excluded) as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    import src  # noqa: F401  (loads the optimized BLAS; must precede mlx)

    # isort: split
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map

    from src.backend import policy
    from src.config import load_config
    from src.train.assembly import assemble

    distributed = bool(os.environ.get("MLX_HOSTFILE"))
    group = mx.distributed.init(strict=True, backend="ring") if distributed else None
    sets = [f"model.n_layers={args.layers}"] if args.layers else []
    sets += ["training.seed=0", "training.precision=fp32", "training.compile=true"]
    cfg = load_config(args.config, sets)
    policy.configure_process()
    parts = assemble(cfg, group)
    model, opt, step = parts.model, parts.optimizer, parts.train_step
    shape = (1, args.batch_size, cfg.model.context_length + 1)
    batch = mx.random.randint(0, cfg.model.vocab_size, shape)

    def timed(fn) -> float:
        times = []
        for _ in range(args.warmup + args.steps):
            tic = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - tic)
        return statistics.median(times[args.warmup :])

    result = {
        "params": model.num_params(),
        "step_s": timed(lambda: [*step(batch), model.state, opt.state]),
    }
    if group is not None:
        grads = tree_map(mx.ones_like, model.trainable_parameters())
        mx.eval(grads)
        result["allreduce_s"] = timed(lambda: nn.average_gradients(grads, group))
        result["flag_s"] = timed(
            lambda: mx.distributed.all_sum(mx.array(1), group=group)
        )
    if group is None or group.rank() == 0:
        print(json.dumps(result), flush=True)


def run(n: int, argv: list[str], ring: bool) -> dict:
    """Run the worker in `n` processes at once, as the ranks of a ring or not;
    returns the first process's result."""
    from src.train.launch import free_ports

    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    env.pop("MLX_HOSTFILE", None)
    with tempfile.TemporaryDirectory() as tmp:
        if ring:
            hostfile = Path(tmp) / "hosts.json"
            hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
            env["MLX_HOSTFILE"] = str(hostfile)
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", *argv],
                env={**env, "MLX_RANK": str(r)},
                stdout=subprocess.PIPE,
                text=True,
            )
            for r in range(n)
        ]
        outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/model_config_small.yaml")
    p.add_argument("--batch-size", type=int, default=1, help="per rank")
    p.add_argument("--layers", type=int, help="override model.n_layers")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.worker:
        return worker(args)
    argv = sys.argv[1:]
    one, apart, two = run(1, argv, False), run(2, argv, False), run(2, argv, True)
    grad_mb = one["params"] * 4 / 2**20
    extra = two["step_s"] - apart["step_s"]
    print(
        f"{args.config}"
        + (f" with {args.layers} layers" if args.layers else "")
        + f": {one['params']:,} parameters ({grad_mb:.0f} MiB of fp32 gradients), "
        f"micro-batch {args.batch_size} per rank, median of {args.steps} steps, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| measurement | seconds |\n|---|---|")
    print(f"| step, 1 process | {one['step_s']:.3f} |")
    print(f"| step, 2 independent processes at once | {apart['step_s']:.3f} |")
    print(f"| step, 2 ranks (gradients averaged) | {two['step_s']:.3f} |")
    print(f"| communication overhead per step (ranks - independent) | {extra:+.3f} |")
    print(f"| `average_gradients` alone, 2 ranks | {two['allreduce_s']:.3f} |")
    print(f"| all_sum of one int (stop flag) alone | {two['flag_s']:.6f} |")
    print(
        f"\nall-reduce alone: {two['allreduce_s'] / two['step_s']:.0%} of the 2-rank "
        f"step; {grad_mb / two['allreduce_s']:.0f} MiB/s of gradients"
    )


if __name__ == "__main__":
    main()
