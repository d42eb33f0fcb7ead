"""The rule of each config field: numbers in a declared range, one of a set of
names, a folder name; the limits they use. Every field of `src.config.schema`
is declared through these, so `src.config.checks` can check them all."""

from __future__ import annotations

import math
import os
from dataclasses import field

OPTIMIZERS = (
    "adamw",
    "muon",
)  # training.optimizer: the classes are in src/train/optim.py
PRECISIONS = ("auto", "fp32", "bf16")  # training.precision (src/backend/policy.py)
REPORTERS = ("tensorboard", "wandb")  # logging.report_to (src/train/reporters.py)
LOSS_ON = ("auto", "all", "assistant")
SCHEDULES = ("cosine", "wsd")  # training.schedule (src/train/schedule.py)
KERNEL_SETS = ("auto", "portable", "fused")  # training.kernels (src/backend/kernels.py)

MAX_COUNT = 2**31 - 1  # steps, sizes and intervals reach MLX as int32 arrays
MAX_SEED = 2**63 - 1  # mx.random.seed and numpy take it (src/train/step.py)
MAX_VOCAB = 2**20  # 4x the largest vocabularies in use (src/tokenizer/spm.py)
MAX_FILE_BYTES = 1 << 20  # a config is a few hundred bytes; /dev/zero is not one
MAX_DEPTH = 16  # YAML nesting; a config needs 3 (section, key, list)


def _show(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def num(default, *, ge=None, gt=None, le=None, lt=None, off=None):
    """A numeric field with its rule: finite, >= ge (or > gt) and <= le (or < lt);
    `off` is one more value allowed outside that (e.g. 0 = greedy). Every number of
    the config is declared this way, so none escapes the range check."""
    lo, hi = (ge if gt is None else gt), (le if lt is None else lt)
    if lo is None or hi is None:
        raise TypeError("a config number needs a lower and an upper bound")
    left, right = ("(" if gt is not None else "["), (")" if lt is not None else "]")
    rule = f"in {left}{_show(lo)}, {_show(hi)}{right}"
    rule = rule if off is None else f"{_show(off)} or {rule}"

    def check(v: float) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return "must be a finite number"
        ok = (v > lo if gt is not None else v >= lo) and (
            v < hi if lt is not None else v <= hi
        )
        return None if ok or v == off else f"must be {rule}"

    return field(default=default, metadata={"check": check})


def choice(default: str, options: tuple[str, ...]):
    """A string field that must be one of `options`."""

    def check(v: str) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}"

    return field(default=default, metadata={"check": check})


def choices(options: tuple[str, ...]):
    """A list field (default empty) of distinct strings, each one of `options`;
    a single string is a list of one."""

    def check(v: list[str]) -> str | None:
        for i, item in enumerate(v):
            if item not in options:
                return f"{item!r} is not one of {', '.join(options)}"
            if item in v[:i]:
                return f"{item!r} is listed twice"
        return None

    return field(default_factory=list, metadata={"check": check})


def _folder_name(v: str) -> str | None:
    """run_name becomes a folder under checkpoint.dir and logging.dir."""
    seps = {"/", "\\", os.sep, os.altsep} - {None}
    if v in (".", "..") or any(s in v for s in seps) or len(v.encode()) > 200:
        return "must be a folder name: no '/' or '\\', not '.' or '..', <= 200 bytes"
    if any(ord(c) < 32 or c == "\x7f" for c in v):
        return "must not hold control characters (a newline, a tab...)"
    return None


# model.mlp: gated (act(gate(x)) * up(x)) or plain (act(up(x))) feed-forward; GELU is
# the exact (erf) one. model.norm / norm_position / position: src/model/transformer.py
GATED_MLPS = ("swiglu", "geglu")
MLPS = (*GATED_MLPS, "silu", "gelu", "relu2")
NORMS = ("rmsnorm", "layernorm", "none")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("rope", "none")
MATFORMER_LOSSES = ("sample", "sum")  # training.matformer_loss (src/model/matformer.py)


def _fractions(v: list[float]) -> str | None:
    """model.matformer_widths: increasing fractions in (0, 1] ending with 1.0."""
    if not v:
        return None
    if any(not math.isfinite(f) or not 0 < f <= 1 for f in v):
        return "every width must be a fraction in (0, 1]"
    if any(b <= a for a, b in zip(v, v[1:])) or v[-1] != 1.0:
        return (
            "must be increasing and end with 1.0 (the whole FFN), e.g. [0.25, 0.5, 1.0]"
        )
    return None
