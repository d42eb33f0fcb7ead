"""The non-GEMM kernels alone, forward + backward: ours vs MLX's own ops and torch.

    python scripts/benchmark.py --breakdown   # where a whole step's time goes
    python scripts/bench_kernels.py [--tokens 1024] [--vocab 4096] [--width 1024]
                                    [--repeats 7] [--torch] [--json PATH]

Times, on one stream (one core), each compiled forward + backward at a step's
shapes, median of --repeats after a warm-up:
  cross_entropy  over (tokens x vocab) fp32 logits
  softmax        over (tokens x width), as attention's scores
  silu_mul       SiLU(gate) * up over (tokens x width), the SwiGLU activation
each as
  ours       `src.backend.kernels` portable set (what the CPU step runs)
  mlx_fused  MLX's own op (`nn.losses.cross_entropy`, `mx.softmax`, `nn.silu`:
             what GPUs run)
  torch      torch.nn.functional, one thread (--torch)
Each row gives ms and the ratio to `ours` measured in the same run (> 1: ours is
faster). Default shape: one stream's share of the speedrun step (8 x 256 tokens
over 2 streams: 1024 rows; vocab 4096).
The report opens with the machine (`src.backend.machine`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import timed  # noqa: E402

import src  # noqa: E402, F401  (the optimized BLAS, before MLX)
from src import cli  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (python scripts/bench_kernels.py -h) "
        "for what each row measures.",
    )
    size = cli.int_in(1, 1 << 20)
    p.add_argument("--tokens", type=size, default=1024, help="rows (default 1024)")
    p.add_argument("--vocab", type=size, default=4096, help="logit width (4096)")
    p.add_argument("--width", type=size, default=1024, help="SiLU/softmax width (1024)")
    p.add_argument("--repeats", type=cli.int_in(1, 10_000), default=7,
                   help="timed calls (7)")  # fmt: skip
    p.add_argument("--torch", action="store_true", help="also time torch, 1 thread")
    p.add_argument("--json", type=Path, help="write the rows here as JSON")
    return p.parse_args(argv)


def mlx_rows(args) -> dict[str, dict[str, float]]:
    import mlx.core as mx
    import mlx.nn as nn

    from src.backend import kernels

    def vg(fn, *inputs):
        """Compiled forward + backward of sum(fn(x) * cotangent) in x."""
        cot = mx.random.uniform(shape=fn(*inputs).shape, key=mx.random.key(9))
        step = mx.compile(mx.value_and_grad(lambda x, *r: (fn(x, *r) * cot).sum()))
        return lambda: mx.eval(step(*inputs))

    key = mx.random.key(0)
    logits = mx.random.normal((args.tokens, args.vocab), key=key) * 3
    targets = mx.random.randint(0, args.vocab, (args.tokens,), key=key)
    x = mx.random.normal((args.tokens, args.width), key=mx.random.key(1)) * 3
    up = mx.random.normal((args.tokens, args.width), key=mx.random.key(2))
    mx.eval(logits, targets, x, up)

    kernels.set_kernel_set("portable")  # ours; MLX's ops do not read it
    cases = {
        "cross_entropy": {
            "ours": vg(kernels.cross_entropy, logits, targets),
            "mlx_fused": vg(nn.losses.cross_entropy, logits, targets),
        },
        "silu_mul": {
            "ours": vg(lambda g, u: kernels.silu(g) * u, x, up),
            "mlx_fused": vg(lambda g, u: nn.silu(g) * u, x, up),
        },
        "softmax": {
            "ours": vg(kernels.softmax, x),
            "mlx_fused": vg(lambda z: mx.softmax(z, axis=-1, precise=True), x),
        },
    }
    out: dict[str, dict[str, float]] = {}
    with mx.stream(mx.new_stream(mx.default_device())):
        for name, impls in cases.items():
            runs = {impl: [] for impl in impls}
            for run in impls.values():
                run()  # compile and allocate
            for _ in range(args.repeats):  # interleaved: all see the same load
                for impl, run in impls.items():
                    runs[impl] += timed(run, 1)
            out[name] = {impl: statistics.median(t) for impl, t in runs.items()}
    kernels.set_kernel_set(None)
    return out


def torch_rows(args, rows) -> None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("bench_kernels: torch is not installed: no torch rows", file=sys.stderr)
        return
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.tokens, args.vocab, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    x = (torch.randn(args.tokens, args.width, generator=g) * 3).requires_grad_()
    up = torch.randn(args.tokens, args.width, generator=g)

    def vg(fn, leaf, *rest):
        out = fn(leaf, *rest)
        cot = torch.rand(out.shape, generator=g)

        def run():
            leaf.grad = None
            (fn(leaf, *rest) * cot).sum().backward()

        return run

    fns = {
        "cross_entropy": vg(lambda z, t: F.cross_entropy(z, t, reduction="none"),
                            logits, targets),
        "silu_mul": vg(lambda a, u: F.silu(a) * u, x, up),
        "softmax": vg(lambda z: torch.softmax(z, dim=-1), x),
    }  # fmt: skip
    for name, run in fns.items():
        rows[name]["torch"] = statistics.median(timed(run, args.repeats, run))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from src.backend import machine

    about = machine.describe()
    rows = mlx_rows(args)
    if args.torch:
        torch_rows(args, rows)
    print(f"machine: {machine.summary(about)}\n")
    print(f"# Kernels alone, forward + backward, one stream: {machine.short(about)}")
    print(f"tokens {args.tokens}, vocab {args.vocab}, width {args.width}, "
          f"median of {args.repeats}\n")  # fmt: skip
    print("| kernel | impl | ms | vs ours |")
    print("|---|---|---|---|")
    for name, impls in rows.items():
        for impl, ms in impls.items():
            print(f"| {name} | {impl} | {ms:.2f} | {ms / impls['ours']:.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        shape = dict(tokens=args.tokens, vocab=args.vocab, width=args.width)
        payload = dict(machine=about, shape=shape, repeats=args.repeats, ms=rows)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
