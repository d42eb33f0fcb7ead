"""Validation metrics: mean next-token loss, perplexity and bits per byte of a
model on a fixed set of windows. The trainer's validation and `python -m src.eval`
both use `Evaluator`, so their numbers agree.

Windows are a token file's deterministic, non-overlapping full-context windows:
window i is tokens[i*L : i*L+L+1] (inputs w[:-1], targets w[1:]), so every target
token is scored once, with between 1 and L tokens of context. Bits per byte =
(summed loss in nats) / ln 2 / (UTF-8 bytes of the target text), comparable across
tokenizers; the bytes come from decoding each window's targets with the run's
tokenizer (special tokens such as EOS decode to zero bytes).

Masked evaluation (chat data with an assistant mask, `masked=True`): only the
targets the mask counts are scored; the loss is their mean, and bits per byte is
over their bytes (each window's counted targets decoded together), the number
the chat fine-tune's training loss estimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..data.tokens import TokenLoader
from ..model.loss import summed_loss

# batch (B, L+1) [, mask (B, L+1) bool] -> summed loss in nats
LossSum = Callable[..., mx.array]


def make_eval_fn(
    model: nn.Module,
    compile: bool = True,
    streams: list[mx.Stream] | None = None,
    masked: bool = False,
) -> LossSum:
    """eval(batch (B, L+1)) -> summed next-token loss in nats (fp32 weights);
    with `masked`, eval(batch, mask) sums the targets the mask counts."""

    def total_loss(batch: mx.array) -> mx.array:
        return summed_loss(model, batch, streams)

    def masked_loss(batch: mx.array, mask: mx.array) -> mx.array:
        return summed_loss(model, batch, streams, mask=mask)

    fn = masked_loss if masked else total_loss
    return mx.compile(fn, inputs=[model.state]) if compile else fn


@dataclass
class EvalResult:
    loss: float
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float:
        return self.loss * self.tokens / math.log(2) / max(self.bytes, 1)

    def as_dict(self) -> dict:
        return {
            "val_loss": self.loss,
            "val_ppl": self.perplexity,
            "val_bpb": self.bits_per_byte,
            "val_tokens": self.tokens,
        }


def count_bytes(
    batches: list[np.ndarray],
    decode: Callable[[list[int]], str],
    masks: list[np.ndarray] | None = None,
) -> int:
    """UTF-8 bytes of the target tokens (all but the first of each window; with
    `masks`, only those they count)."""
    if masks is None:
        return sum(
            len(decode(row[1:].tolist()).encode("utf-8")) for b in batches for row in b
        )
    return sum(
        len(decode(row[1:][keep[1:]].tolist()).encode("utf-8"))
        for b, m in zip(batches, masks, strict=True)
        for row, keep in zip(b, m, strict=True)
    )


class Evaluator:
    """Evaluates a model on a fixed set of validation windows (cached between
    calls); `masked`: on the targets of the loader's assistant mask only."""

    def __init__(
        self,
        loader: TokenLoader,
        batch_size: int,
        max_tokens: int,
        decode,
        masked: bool = False,
    ):
        self.masked = masked
        self.masks = None
        if masked:
            pairs = list(loader.val_batches(batch_size, max_tokens, with_mask=True))
            self.batches = [b for b, _ in pairs]
            self.masks = [m for _, m in pairs]
            self.tokens = sum(int(m[:, 1:].sum()) for m in self.masks)
        else:
            self.batches = list(loader.val_batches(batch_size, max_tokens))
            self.tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in self.batches)
        self.windows = sum(b.shape[0] for b in self.batches)
        self.bytes = count_bytes(self.batches, decode, self.masks)

    def __call__(
        self,
        loss_sum_fn: Callable[[mx.array], mx.array],
        rank: int = 0,
        world: int = 1,
    ) -> EvalResult:
        """`loss_sum_fn(batch)` returns the summed next-token loss of a batch. With
        `world` data-parallel ranks, each scores batches rank, rank + world, ... and
        the sums are added over the ranks: every rank returns the whole result."""
        total = mx.array(0.0)
        masks = self.masks if self.masked else [None] * len(self.batches)
        for batch, mask in zip(self.batches[rank::world], masks[rank::world]):
            args = [mx.array(batch, dtype=mx.int32)]
            if mask is not None:
                args.append(mx.array(mask))
            total = total + loss_sum_fn(*args)
            mx.eval(total)  # bound memory: one batch in flight
        if world > 1:
            total = mx.distributed.all_sum(total)
        return EvalResult(total.item() / max(self.tokens, 1), self.tokens, self.bytes)
