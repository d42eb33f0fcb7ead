"""The execution policy: how a process runs MLX on the device it has.

Decided here, and nowhere else, from the default device:

| setting | CPU backend | GPU backends (Metal, CUDA) | when |
|---|---|---|---|
| compute dtype (`auto`) | fp32 | bf16 (fp32 master weights) | per run (`compute_dtype`) |
| kernel set (`src.backend.kernels`) | portable | fused | first use |
| streams a micro-batch is split over | one per core (at most 4) | one | per run (`streams`) |
| BLAS threads per call | cores / streams | n/a | with `streams` |
| allocator cache after a step | the step's peak | MLX's default (larger) | after the first step (`keep_step_buffers`) |
| evaluation order width | wide (`MLX_BFS_MAX_WIDTH`) | MLX's default | at start, before the first eval (`configure_process`) |

Why, on the CPU backend: most non-GEMM kernels there are single-threaded, so rows
split over one stream per core run them side by side (each stream with a
one-thread BLAS); MLX orders a graph breadth-first only `MLX_BFS_MAX_WIDTH` (20)
nodes wide, which queues one stream's whole forward pass before the other's; and
the CPU allocator caches only 32 MiB, so each step faulted its activations in
again. The measurements are in docs/performance.md.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import blas

DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}

BFS_WIDTH_VAR, BFS_WIDTH = "MLX_BFS_MAX_WIDTH", "100000"
MAX_AUTO_STREAMS = 4

_STREAMS: list[mx.Stream] = []


def on_gpu() -> bool:
    """Whether MLX computes on a GPU backend (Metal or CUDA) by default."""
    return mx.default_device().type == mx.DeviceType.gpu


def configure_process() -> None:
    """Set what must be set before MLX's first evaluation in this process: a wide
    evaluation order on the CPU backend (MLX reads the variable once, at its first
    eval), unless the user set one. Entry points call it first thing."""
    if not on_gpu():
        os.environ.setdefault(BFS_WIDTH_VAR, BFS_WIDTH)


def compute_dtype(precision: str) -> mx.Dtype:
    """`training.precision` as a dtype: `auto` = bf16 on GPU backends, fp32 on the
    CPU backend, where bf16 matmuls have no fast kernel."""
    if precision == "auto":
        return mx.bfloat16 if on_gpu() else mx.float32
    return DTYPES[precision]


def _cores(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def stream_count(n: int = 0, world: int = 1) -> int:
    """How many streams `streams(n, world)` gives: n, or for 0 one per core left
    to each of `world` processes on the CPU backend (at most MAX_AUTO_STREAMS)
    and one on GPUs."""
    if n:
        return n
    if mx.default_device().type == mx.DeviceType.cpu:
        return min(MAX_AUTO_STREAMS, _cores(world))
    return 1


def streams(n: int = 0, world: int = 1) -> list[mx.Stream]:
    """The streams a micro-batch is split across (`training.streams`; 0 = auto:
    one per core left to each of `world` processes on the CPU backend, at most
    MAX_AUTO_STREAMS, and one on GPUs). Several CPU streams get a BLAS of
    cores / n threads each. Streams are created once per process and reused."""
    device = mx.default_device()
    n = stream_count(n, world)
    if device.type == mx.DeviceType.cpu and n > 1:
        blas.set_threads(max(1, _cores(world) // n))
    while len(_STREAMS) < n - 1:
        _STREAMS.append(mx.new_stream(device))
    return [mx.default_stream(device), *_STREAMS[: n - 1]]


def keep_step_buffers() -> None:
    """After a training step: let MLX's allocator keep as many freed bytes for reuse
    as that step needed at its peak, so the next step of the same shapes takes its
    buffers from the cache. A larger limit (GPU backends cache up to their memory
    limit) is kept; never more than the step itself used is added."""
    limit = mx.get_peak_memory()
    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)


def describe(streams: list[mx.Stream]) -> str:
    """One log line: what this process runs with."""
    width = os.environ.get(BFS_WIDTH_VAR, "MLX's default")
    return (
        f"execution: {len(streams)} stream(s) per micro-batch on "
        f"{mx.default_device()}; evaluation width {BFS_WIDTH_VAR}={width}"
    )
