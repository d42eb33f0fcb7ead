"""The measured execution policy against every fixed one, on this machine.

    python scripts/bench_policy.py [--config speedrun] [--rounds 5] [--steps 4]

Every candidate policy of `src.train.autotune` (streams x kernel set) as a fixed
choice: median seconds per compiled training step, rounds taken in turns so all
see the same machine load. Then the autotuner itself, from an empty cache: what
it chose, what that costs against the best fixed policy (target: within 3%), and
its start-up time against a 30-minute run (target: under 2%, 36 s).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import src  # noqa: F401,E402  (loads the optimized BLAS; must precede mlx)

# isort: split
import mlx.core as mx  # noqa: E402

from src.backend import kernels  # noqa: E402
from src.backend.machine import describe, summary  # noqa: E402
from src.config import load_config  # noqa: E402
from src.train import autotune  # noqa: E402
from src.train.assembly import assemble  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def step_fn(cfg, p: autotune.Policy):
    """A timed step of `cfg` under `p`, compiled and warmed up."""
    trial = copy.deepcopy(cfg)
    trial.training.streams, trial.training.kernels = p.streams, p.kernels
    kernels.set_kernel_set(p.kernels)
    parts = assemble(trial, compile=True)
    m, t = trial.model, trial.training
    x = mx.random.randint(0, m.vocab_size, (1, t.batch_size, m.context_length + 1))
    state = (parts.model.state, parts.optimizer.state)

    def run() -> float:
        kernels.set_kernel_set(p.kernels)
        tic = time.perf_counter()
        mx.eval(parts.train_step(x), state)
        return time.perf_counter() - tic

    run(), run()
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="speedrun", help="a configs/ name")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps per round")
    args = p.parse_args(argv)
    os.environ.pop(autotune.ENV_OFF, None)
    cfg = load_config(ROOT / "configs" / f"{args.config}.yaml")
    print(f"machine: {summary(describe())}")
    m = cfg.model
    print(
        f"config {args.config}: {m.num_params() / 1e6:.1f}M parameters, batch "
        f"{cfg.training.batch_size} x {m.context_length}"
    )
    options = autotune.candidates(cfg)
    runs = {o: step_fn(cfg, o) for o in options}
    times: dict = {o: [] for o in options}
    for _ in range(args.rounds):
        for o, run in runs.items():
            times[o] += [run() for _ in range(args.steps)]
    fixed = {o: statistics.median(t) for o, t in times.items()}
    best = min(fixed, key=fixed.get)
    with tempfile.TemporaryDirectory() as cache:
        tuned = load_config(ROOT / "configs" / f"{args.config}.yaml")
        tic = time.perf_counter()
        line = autotune.tune(tuned, path=Path(cache) / "policy.json")
        startup = time.perf_counter() - tic
    chosen = autotune.Policy(tuned.training.streams, tuned.training.kernels)
    print(f"\n{line}\n")
    print("| policy | s/step (median) | vs best fixed |")
    print("|---|---|---|")
    for o, s in fixed.items():
        mark = " (autotuned)" if o == chosen else ""
        print(f"| {o}{mark} | {s:.4f} | {s / fixed[best]:.3f}x |")
    loss = fixed[chosen] / fixed[best] - 1
    print(
        f"\nautotuned {chosen}: {100 * loss:+.1f}% step time against the best fixed "
        f"policy ({best}; target: at most +3%); start-up {startup:.1f} s = "
        f"{100 * startup / 1800:.2f}% of a 30-minute run (target: under 2%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
