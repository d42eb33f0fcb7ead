"""Helpers shared by scripts/benchmark.py's MLX and torch workers (bench_torch.py):
process memory, repeated timings, the GEMM ceiling and the step's projections.
No MLX or torch import here: each worker process imports only its framework."""

from __future__ import annotations

import os
import time

# The MFU ceiling's GEMM is n x n x n: large enough to reach a device's peak.
GEMM_SIZE_CPU, GEMM_SIZE_GPU = 2048, 8192
GEMM_SIZE_CPU_BF16 = 1024  # CPU bf16 GEMMs have no fast kernel: 2048³ takes minutes
GEMM_TIME_CAP_S = 10.0  # stop repeating the ceiling's GEMM after this much time


def gemm_size(on_gpu: bool, precision: str) -> int:
    """The default n of the n³ ceiling GEMM on a device, in a precision."""
    if on_gpu:
        return GEMM_SIZE_GPU
    return GEMM_SIZE_CPU_BF16 if precision == "bf16" else GEMM_SIZE_CPU


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(run, repeats: int, warm_up=None) -> list[float]:
    """Milliseconds of `repeats` calls of `run()`, after `warm_up()` if given
    (a component's warm-up runs one layer: enough to compile and allocate)."""
    if warm_up is not None:
        warm_up()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run()
        times.append((time.perf_counter() - tic) * 1e3)
    return times


def best_gflops(matmul, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of the fastest of up to `reps` calls of `matmul()` (an n³ GEMM that
    returns when its result is computed), after one untimed call; repeats stop
    once they took GEMM_TIME_CAP_S in all (a slow dtype on a slow device)."""
    matmul()
    times: list[float] = []
    while len(times) < reps and sum(times) < GEMM_TIME_CAP_S:
        tic = time.perf_counter()
        matmul()
        times.append(time.perf_counter() - tic)
    return 2 * n**3 / min(times) / 1e9


def projections(m) -> list[tuple[int, int]]:
    """(in, out) features of one block's linear layers."""
    d, hd, f = m.d_model, m.head_dim, m.ffn_dim
    mlp = [(d, f), (d, f), (f, d)] if m.gated else [(d, f), (f, d)]
    return [(d, m.n_heads * hd), (d, m.kv_heads * hd), (d, m.kv_heads * hd),
            (m.n_heads * hd, d), *mlp]  # fmt: skip
