"""MatFormer (nested FFN): the first k neurons of every FFN form a smaller FFN.

A model trained with `model.matformer_widths` (fractions of `ffn_dim`, the last
1.0) is usable at each listed width: `use_width(model, f)` runs it on the first
round(f * ffn_dim) neurons of every layer's MLP (`src.model.transformer.MLP.width`),
and `narrowed` (a model) / `slice_weights` (weights, for export) cut those
neurons out into a plain model with d_ff = k (gate/up rows and down columns
0..k-1), which computes the same.

Training (`training.matformer_loss`): `sample` trains one width per step, drawn
from (seed, step) alone (`sample_width`: a resumed run and every data-parallel
rank draw the same) with probability proportional to the width, so the full
model, the one validation ranks checkpoints by, gets most steps while every
neuron of a small width is also trained by each larger width's steps; `sum`
takes the mean of the losses at every width in each step (one forward per width).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import Config, ModelConfig
from ..errors import ConfigError

# the FFN weights a width cuts: rows of gate/up (neurons out), columns of down
_ROWS = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
_COLUMNS = ("mlp.down_proj.weight",)


def neurons(ffn_dim: int, fraction: float) -> int:
    """The neurons a width fraction keeps (at least one)."""
    return max(1, round(fraction * ffn_dim))


def set_width(model: nn.Module, fraction: float | None) -> None:
    """Make every MLP of `model` use its first `fraction` of neurons (None or
    1.0: all of them). The width is a Python value: a compiled function traced at
    one width keeps it (make one per width)."""
    ffn_dim = model.config.ffn_dim
    n = None if fraction is None or fraction >= 1.0 else neurons(ffn_dim, fraction)
    for layer in model.model.layers:
        layer.mlp.width = n


@contextlib.contextmanager
def use_width(model: nn.Module, fraction: float | None) -> Iterator[None]:
    """`set_width` for the duration of a `with` block (back to all after)."""
    set_width(model, fraction)
    try:
        yield
    finally:
        set_width(model, None)


def width_key(fraction: float) -> str:
    """How a width names its metrics: val_bpb@0.25."""
    return f"{fraction:g}"


# ------------------------------------------------------------------ training


def sample_weights(widths: list[float]) -> list[float]:
    """The probability `sample_width` draws each width with: proportional to it
    (0.25, 0.5, 1.0 -> 1/7, 2/7, 4/7)."""
    total = sum(widths)
    return [w / total for w in widths]


def sample_width(widths: list[float], seed: int, step: int) -> float:
    """The width optimizer step `step` trains (`training.matformer_loss: sample`):
    a function of (seed, step) only, stable across runs, machines and versions
    (a sha256 of both, not a random generator's state)."""
    digest = hashlib.sha256(f"matformer:{seed}:{step}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    acc = 0.0
    for w, p in zip(widths, sample_weights(widths)):
        acc += p
        if u < acc:
            return w
    return widths[-1]  # acc rounded below 1


def describe(cfg: Config) -> str:
    """The run's MatFormer training, in one line for the log."""
    m, widths = cfg.model, cfg.model.matformer_widths
    sizes = ", ".join(f"{width_key(w)} ({neurons(m.ffn_dim, w)})" for w in widths)
    head = f"MatFormer FFN widths (neurons): {sizes}; "
    if cfg.training.matformer_loss == "sum":
        return head + (
            f"matformer_loss sum: each step's loss is the mean over the "
            f"{len(widths)} widths (a forward and backward at each)"
        )
    odds = ", ".join(f"{p:.2f}" for p in sample_weights(widths))
    return head + (
        f"matformer_loss sample: one width per step, drawn from (seed, step) "
        f"with probabilities {odds}"
    )


# ------------------------------------------------------------ using a width


def check_fraction(cfg: ModelConfig, fraction: float, where: str = "") -> float:
    """`fraction` if the model was trained at that FFN width (1.0, the whole FFN,
    always is); else ConfigError naming model.matformer_widths."""
    if math.isclose(fraction, 1.0):
        return 1.0
    at = f"{where}: " if where else ""
    if not cfg.matformer_widths:
        raise ConfigError(
            f"{at}--ffn-fraction {fraction:g}: this model was not trained as a "
            "MatFormer (model.matformer_widths is empty), so only 1.0 (the whole "
            "FFN) is a usable width"
        )
    for w in cfg.matformer_widths:
        if math.isclose(fraction, w, rel_tol=1e-6):
            return w
    listed = ", ".join(width_key(w) for w in cfg.matformer_widths)
    raise ConfigError(
        f"{at}--ffn-fraction {fraction:g}: not a width this model was trained at "
        f"(model.matformer_widths: {listed})"
    )


def sub_model_config(m: ModelConfig, fraction: float) -> ModelConfig:
    """The plain model of the width: d_ff = its neurons, no MatFormer widths."""
    return dataclasses.replace(
        m, d_ff=neurons(m.ffn_dim, fraction), matformer_widths=[]
    )


def slice_weights(weights: dict, ffn_dim: int, fraction: float) -> dict:
    """Weights (flat names) of the width: every FFN cut to its first neurons
    (copies, contiguous); the other weights are the same arrays."""
    k = neurons(ffn_dim, fraction)
    out = {}
    for name, w in weights.items():
        if name.endswith(_ROWS):
            w = mx.contiguous(w[:k])
        elif name.endswith(_COLUMNS):
            w = mx.contiguous(w[:, :k])
        out[name] = w
    return out


def narrowed(model: nn.Module, fraction: float) -> nn.Module:
    """A plain model of `model`'s FFN width `fraction` (checked: `check_fraction`),
    in the same train/eval mode; `model` itself when the fraction is 1.0."""
    from .transformer import Model  # transformer imports nothing of this module

    m = model.config
    fraction = check_fraction(m, fraction)
    if fraction == 1.0:
        return model
    small = Model(sub_model_config(m, fraction))
    flat = dict(tree_flatten(model.parameters()))
    small.load_weights(list(slice_weights(flat, m.ffn_dim, fraction).items()))
    small.train(model.training)
    mx.eval(small.parameters())
    return small


def sub_width_config(cfg: Config, fraction: float) -> Config:
    """The run config of the exported width: the plain model, and a run_name
    that says its width (`<run>-ffn0.25`), so nothing of the whole model's run
    (its validation log) is taken for this one's."""
    m = sub_model_config(cfg.model, fraction)
    name = f"{cfg.run_name}-ffn{width_key(fraction)}"
    return dataclasses.replace(cfg, model=m, run_name=name)
