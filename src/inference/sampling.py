"""Sampling knobs, in one place: the options, their defaults and checks, and the
functions they become.

`Sampling` is what every mode (one-shot, batch, REPL, the trainer's samples)
passes around; `make_sampler` and `make_processors` turn it into behaviour. The
final draw uses a key of the generation's own, so a generation is reproducible
from its seed without disturbing the trainer's random stream. top-k >= vocab
means "no top-k".

The filters and penalties are written here rather than taken from
`mlx_lm.sample_utils`: importing anything from mlx-lm runs its package
`__init__`, which imports transformers and, where installed, torch (~3 s and
hundreds of MB on the MLX path, including the trainer's samples).
"""

from __future__ import annotations

import argparse
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import mlx.core as mx

from .. import cli

Sampler = Callable[[mx.array, mx.array], mx.array]  # (logits (B, V), key) -> (B,)
Processor = Callable[[mx.array, mx.array], mx.array]  # (history, logits) -> logits
_NEG_INF = -float("inf")


def top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep exactly the k likeliest tokens of each row."""
    drop = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(
        logprobs, drop, mx.array(_NEG_INF, logprobs.dtype), axis=-1
    )


def top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of likeliest tokens whose probability mass is >= p."""
    order = mx.argsort(-logprobs, axis=-1)
    probs = mx.exp(mx.take_along_axis(logprobs, order, axis=-1))
    keep_sorted = (mx.cumsum(probs, axis=-1) - probs) < p  # mass before it < p
    # the likeliest always stays, even for a p that rounds to 0 in float32
    keep_sorted = keep_sorted | (mx.arange(probs.shape[-1]) == 0)
    keep = mx.put_along_axis(
        mx.zeros(logprobs.shape, mx.bool_), order, keep_sorted, axis=-1
    )
    return mx.where(keep, logprobs, _NEG_INF)


def min_p(logprobs: mx.array, m: float) -> mx.array:
    """Keep tokens with probability >= m * (probability of the likeliest)."""
    floor = mx.max(logprobs, axis=-1, keepdims=True) + math.log(m)
    return mx.where(logprobs >= floor, logprobs, _NEG_INF)


class Limit(NamedTuple):
    """The values an option allows: a `kind` in [lo, hi], an end left out where
    `lo_open` / `hi_open`; `note` says what special values mean."""

    kind: type
    lo: float
    hi: float
    note: str = ""
    lo_open: bool = False
    hi_open: bool = False

    def allows(self, value) -> bool:
        """Of this kind (an int is a float, a bool neither) and inside (never NaN)."""
        kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return False
        above = self.lo < value if self.lo_open else self.lo <= value
        return above and (value < self.hi if self.hi_open else value <= self.hi)

    def ends(self) -> str:
        """The interval, e.g. (0, 1]."""
        lo, hi = ("(" if self.lo_open else "["), (")" if self.hi_open else "]")
        top = self.hi  # 2**31-1 reads better than 2147483647
        if top > 2**20 and (top + 1).bit_count() == 1:
            top = f"2**{(top + 1).bit_length() - 1}-1"
        return f"{lo}{self.lo}, {top}{hi}"

    def rule(self) -> str:
        kind = "an integer" if self.kind is int else "a number"
        return f"{kind} in {self.ends()}" + (f" ({self.note})" if self.note else "")

    def parse(self, text: str):
        """An argparse type for this option (`cli.int_in` or `cli.number_in`)."""
        if self.kind is int:
            return cli.int_in(self.lo, self.hi)(text)
        return cli.number_in(
            self.lo, self.hi, lo_open=self.lo_open, hi_open=self.hi_open
        )(text)


# Every bound keeps the arithmetic finite: no temperature, penalty or window can
# turn a logit into inf or NaN (a window longer than the context is simply all of
# it; MLX indexes with 32-bit integers).
MAX_COUNT = 2**31 - 1
LIMITS = {
    "temperature": Limit(float, 0, 100, "0 = greedy"),
    "top_k": Limit(int, 0, MAX_COUNT, "0 = off"),
    "top_p": Limit(float, 0, 1, "1 = off", lo_open=True),
    "min_p": Limit(float, 0, 1, "0 = off", hi_open=True),
    "repetition_penalty": Limit(float, 0.01, 100, "1 = off"),
    "repetition_window": Limit(int, 1, MAX_COUNT),
    "frequency_penalty": Limit(float, -100, 100, "0 = off"),
    "presence_penalty": Limit(float, -100, 100, "0 = off"),
    "seed": Limit(int, 0, 2**63 - 1),
    "max_tokens": Limit(int, 0, MAX_COUNT),
}


@dataclass
class Sampling:
    """Generation options; the defaults are the same in every mode."""

    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 (or >= vocab) = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages repeats
    repetition_window: int = 64  # how many recent tokens the penalties look at
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0
    max_tokens: int = 200
    stop: list[str] = field(default_factory=list)  # stop strings (not in output)

    def check(self) -> Sampling:
        """Raise ValueError naming the first option outside its LIMITS."""
        for name, limit in LIMITS.items():
            if not limit.allows(value := getattr(self, name)):
                raise ValueError(f"{name} must be {limit.rule()}, got {value!r}")
        return self


def make_sampler(s: Sampling, vocab_size: int) -> Sampler:
    """(logits (B, V), key) -> token ids (B,): argmax when temperature is 0, else
    normalize, apply the filters, then one keyed draw."""
    if s.temperature == 0:
        return lambda logits, key: mx.argmax(logits, axis=-1)
    filters = []
    if s.top_p < 1:
        filters.append(lambda x: top_p(x, s.top_p))
    if s.min_p > 0:
        filters.append(lambda x: min_p(x, s.min_p))
    if 0 < s.top_k < vocab_size:
        filters.append(lambda x: top_k(x, s.top_k))
    # capped: 1 / a temperature near 0 would be inf in float32, and 0 * inf NaN
    inv_temp = min(1.0 / s.temperature, 1e30)

    def sampler(logits: mx.array, key: mx.array) -> mx.array:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for f in filters:
            logprobs = f(logprobs)
        # the likeliest at exactly 0: a tiny temperature sends the others to -inf
        # (greedy in the limit), never to NaN
        top = mx.max(logprobs, axis=-1, keepdims=True)
        return mx.random.categorical((logprobs - top) * inv_temp, key=key)

    return sampler


def make_processors(s: Sampling) -> list[Processor]:
    """Penalties over the last `repetition_window` tokens (prompt included); each
    takes one row's history (T,) and its logits (1, V)."""
    w = s.repetition_window
    procs: list[Processor] = []
    if s.repetition_penalty != 1:

        def repetition(history: mx.array, logits: mx.array) -> mx.array:
            seen = history[-w:]  # sign-aware (CTRL): always toward "less likely"
            x = logits[:, seen]
            x = mx.where(x < 0, x * s.repetition_penalty, x / s.repetition_penalty)
            logits[:, seen] = x
            return logits

        procs.append(repetition)
    if s.presence_penalty:

        def presence(history: mx.array, logits: mx.array) -> mx.array:
            logits[:, history[-w:]] -= s.presence_penalty
            return logits

        procs.append(presence)
    if s.frequency_penalty:

        def frequency(history: mx.array, logits: mx.array) -> mx.array:
            counts = mx.zeros((logits.shape[-1],), logits.dtype).at[history[-w:]].add(1)
            return logits - s.frequency_penalty * counts

        procs.append(frequency)
    return procs


# --------------------------------------------------------------------- CLI flags


ALIASES = {"--temperature": ("--temp",)}  # mlx-lm's spelling


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags, with `Sampling`'s defaults (shared by every mode)."""
    d = Sampling()
    g = p.add_argument_group("sampling (the same defaults in every mode)")
    flags = [
        ("--temperature", "X", "0 = greedy"),
        ("--top-k", "N", "keep the N likeliest tokens; 0 = off"),
        ("--top-p", "X", "keep the likeliest tokens holding mass X; 1 = off"),
        ("--min-p", "X", "keep tokens with p >= X * p(top token); 0 = off"),
        ("--repetition-penalty", "X", "divide recent tokens' logits by X"),
        ("--repetition-window", "N", "recent tokens the penalties look at"),
        ("--frequency-penalty", "X", "minus X per recent occurrence"),
        ("--presence-penalty", "X", "minus X if it occurred recently"),
        ("--seed", "N", "sampling seed"),
        ("--max-tokens", "N", "new tokens per completion or reply"),
    ]
    for flag, metavar, text in flags:
        name = flag[2:].replace("-", "_")
        default, limit = getattr(d, name), LIMITS[name]
        shown = default
        if name == "seed":  # resolved by `sampling_from_args`
            default, shown = None, "random, printed on stderr"
        g.add_argument(
            flag, *ALIASES.get(flag, ()), type=limit.parse, default=default,
            metavar=metavar, help=f"{text}; in {limit.ends()} (default {shown})",
        )  # fmt: skip
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end the completion before TEXT (repeatable)",
    )


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    """A checked `Sampling` from parsed flags (raises ValueError). Without
    --seed (None) the seed is random when sampling (temperature > 0), so runs
    differ; greedy decoding takes 0, as it draws nothing."""
    values = {f.name: getattr(args, f.name) for f in fields(Sampling)}
    if values["seed"] is None:
        values["seed"] = secrets.randbelow(2**32) if values["temperature"] else 0
    return Sampling(**values).check()
