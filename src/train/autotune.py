"""The CPU execution policy, measured where the run happens.

On the CPU backend two settings decide most of a step's time, and which is best
depends on the machine (its GEMM speed against its scalar, single-threaded
non-GEMM kernels) and the shape: the streams a micro-batch is split over
(`training.streams`: one, or one per core, each with a one-thread BLAS) and the
kernel set (`training.kernels`: MLX's fused kernels, or the portable ones of
`src.backend.kernels`). With both left at auto, a new run times each candidate
for a few compiled steps on random tokens (a throwaway copy of the model, as the
time budget does), keeps the fastest, logs the times and writes the choice into
the run's config, so every checkpoint records it and a resumed run reuses it
(a policy may change the bits of a step; resume stays exact). The choice is
cached per (machine, model, batch, dtype) in `~/.cache/mlx-slm/policy.json`
(`SLM_CACHE_DIR` moves it): the next run of that shape starts at once.

A setting given in the config (or SLM_KERNELS) is used as given; GPU backends
and data-parallel runs are not tuned (fused kernels, one stream);
`training.autotune: false` or SLM_AUTOTUNE=off keeps the defaults of
`src.backend.policy` without measuring.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx

from ..backend import kernels, machine, policy
from ..config import Config
from ..files import atomic_file

ENV_OFF = "SLM_AUTOTUNE"  # "off": never measure (tests, scripted benchmarks)
CACHE_ENV = "SLM_CACHE_DIR"
WARMUP_STEPS, TIMED_STEPS = 2, 3  # per candidate: compile + allocator, then timed


@dataclass(frozen=True)
class Policy:
    streams: int
    kernels: str  # portable | fused

    def __str__(self) -> str:
        return f"{self.streams} stream{'s' if self.streams > 1 else ''}, {self.kernels} kernels"


def cache_file() -> Path:
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlx-slm"
    return Path(base) / "policy.json"


def candidates(cfg: Config) -> list[Policy]:
    """The policies worth timing for `cfg` on this process's CPU: each setting
    left at auto varies (streams 1 or one per core, up to 4; kernels portable or
    fused), a forced one (config or SLM_KERNELS) stays."""
    t = cfg.training
    cores = max(1, os.cpu_count() or 1)
    per_core = min(policy.MAX_AUTO_STREAMS, cores, t.batch_size)
    streams = [t.streams] if t.streams else sorted({per_core, 1}, reverse=True)
    forced = os.environ.get(kernels.ENV_VAR, "").strip().lower()
    if t.kernels != "auto":
        sets = [t.kernels]
    elif forced in ("portable", "fused"):
        sets = [forced]
    else:
        sets = ["portable", "fused"]
    return [Policy(s, k) for s in streams for k in sets]


def cache_key(cfg: Config, world: int = 1) -> str:
    """What a measured choice depends on: the machine (CPU, cores, BLAS, MLX),
    the model's shape, the micro-batch and the precision."""
    m = machine.describe()
    what = {
        "cpu": [m["cpu_model"], m["usable_cores"], m["isa"]],
        "blas": [m["blas"].get("name"), m["blas"].get("core")],
        "mlx": m["mlx"],
        "model": {k: v for k, v in vars(cfg.model).items() if k != "dropout"},
        "batch": cfg.training.batch_size,
        "precision": cfg.training.precision,
        "world": world,
    }
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_cache(path: Path) -> dict:
    """The cache's entries; an unreadable or malformed file is an empty cache
    (it is only a cache: measuring again is always right)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_policy(entry: object, options: list[Policy]) -> Policy | None:
    """The policy a cache entry names, if it is one of `options`."""
    if not isinstance(entry, dict):
        return None
    try:
        p = Policy(int(entry["streams"]), str(entry["kernels"]))
    except (KeyError, TypeError, ValueError):
        return None
    return p if p in options else None


def write_cache(
    path: Path, key: str, chosen: Policy, times: dict[Policy, float]
) -> str | None:
    """Add `key`'s choice to the cache file; a reason when it cannot be written."""
    data = read_cache(path)
    data[key] = {
        "streams": chosen.streams,
        "kernels": chosen.kernels,
        "seconds_per_step": {str(p): round(s, 5) for p, s in times.items()},
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        with atomic_file(path, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


def choose(
    options: list[Policy], measure: Callable[[Policy], float]
) -> tuple[Policy, dict[Policy, float]]:
    """Time each option (`measure` gives seconds per step) and pick the fastest;
    ties go to the earlier option, so the choice is a function of the times."""
    times = {p: measure(p) for p in options}
    best = min(options, key=lambda p: (times[p], options.index(p)))
    return best, times


def apply(cfg: Config, chosen: Policy) -> None:
    """Make `chosen` the run's policy: in its config (and so in every checkpoint)
    and in the kernel set of this process."""
    cfg.training.streams = chosen.streams
    cfg.training.kernels = chosen.kernels
    kernels.set_kernel_set(chosen.kernels)


def time_policy(cfg: Config, p: Policy, group=None) -> float:
    """Seconds of a compiled step of `cfg` under policy `p` (the least of the
    timed steps), on a throwaway model and random tokens."""
    from .assembly import assemble  # assembly imports the model; keep this light

    trial = copy.deepcopy(cfg)
    trial.training.streams = p.streams
    previous = kernels.kernel_set()
    kernels.set_kernel_set(p.kernels)
    parts = None
    try:
        parts = assemble(trial, group, compile=True)
        t, m = trial.training, trial.model
        tokens = mx.random.randint(
            0, m.vocab_size, (1, t.batch_size, m.context_length + 1)
        )
        state = (parts.model.state, parts.optimizer.state)
        times = []
        for i in range(WARMUP_STEPS + TIMED_STEPS):
            tic = time.perf_counter()
            mx.eval(parts.train_step(tokens), state)
            if i == 0:  # as the trainer does after its first step
                policy.keep_step_buffers()
            if i >= WARMUP_STEPS:
                times.append(time.perf_counter() - tic)
    finally:
        kernels.set_kernel_set(previous)
        del parts
        mx.clear_cache()  # the next candidate starts from the same allocator
    return min(times)  # noise only adds time: the least is the policy's own


def tune(
    cfg: Config,
    world: int = 1,
    measure: Callable[[Policy], float] | None = None,
    path: Path | None = None,
) -> str | None:
    """Decide the run's execution policy (see the module docstring) and write it
    into `cfg`; the line to log, or None when there is nothing to say (a GPU
    backend). `measure` replaces the timing (tests)."""
    t = cfg.training
    if policy.on_gpu():
        return None
    options = candidates(cfg)
    if len(options) == 1:
        apply(cfg, options[0])
        return (
            f"execution policy: {options[0]} (set in the config or recorded by the run)"
        )
    off = os.environ.get(ENV_OFF, "").strip().lower() in ("0", "off", "false", "no")
    if not t.autotune or off or world > 1:
        why = "data-parallel run" if world > 1 else "autotune off"
        default = Policy(policy.stream_count(t.streams, world), kernels.default_set())
        apply(cfg, default if default in options else options[0])
        return f"execution policy: {Policy(t.streams, t.kernels)} ({why}: not measured)"
    path = path or cache_file()
    key = cache_key(cfg, world)
    entry = read_cache(path).get(key)
    hit = cached_policy(entry, options)
    if hit is not None:
        apply(cfg, hit)
        return (
            f"execution policy: {hit} (measured on this machine for this shape on "
            f"{entry.get('measured', '?')}; cached in {path})"
        )
    tic = time.perf_counter()
    best, times = choose(options, measure or (lambda p: time_policy(cfg, p)))
    spent = time.perf_counter() - tic
    apply(cfg, best)
    problem = write_cache(path, key, best, times)
    tried = ", ".join(f"{p}: {s:.3f}" for p, s in times.items())
    line = (
        f"execution policy: {best}, the fastest of {len(options)} measured in "
        f"{spent:.0f} s (s/step: {tried}); cached in {path}"
    )
    return line + (f" (not cached: {problem})" if problem else "")


def keep_recorded(meta: dict, cfg: Config) -> None:
    """A resumed run keeps the policy its checkpoint recorded, for the settings
    the config leaves at auto (an explicit setting is the user's choice)."""
    saved = meta.get("config", {}).get("training", {})
    t = cfg.training
    if not t.streams and isinstance(saved.get("streams"), int) and saved["streams"] > 0:
        t.streams = saved["streams"]
    if t.kernels == "auto" and saved.get("kernels") in ("portable", "fused"):
        t.kernels = saved["kernels"]
    if "kernels" not in saved:  # saved before policies were measured: the defaults
        t.autotune = False
