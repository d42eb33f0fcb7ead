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

Mixture of experts (`model.moe_experts`): the loss stays the cross-entropy
alone (comparable with a dense model's), and the result adds `val_moe_aux`, the
load-balancing loss (mean over the MoE layers, `src.model.moe`; 1.0 is perfect
balance, E one expert for everything) averaged over the validation tokens, and
`val_expert_share`, per MoE layer the share of the top-k assignments each
expert got (sums to 1 per layer; 1/E each when balanced). Dense models' results
are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..data.loader import TokenLoader
from ..model.loss import routed_summed_loss, summed_loss

# batch (B, L+1) [, mask (B, L+1) bool] -> summed loss in nats; an MoE model's
# -> (summed loss, aux and load (layers, E) summed over its tokens)
LossSum = Callable[..., mx.array | tuple[mx.array, ...]]


def make_eval_fn(
    model: nn.Module,
    compile: bool = True,
    streams: list[mx.Stream] | None = None,
    masked: bool = False,
) -> LossSum:
    """eval(batch (B, L+1)) -> summed next-token loss in nats (fp32 weights);
    with `masked`, eval(batch, mask) sums the targets the mask counts. For an
    MoE model, the loss is the cross-entropy alone, returned with the routing
    sums `Evaluator` adds up (see `LossSum`)."""
    moe = bool(getattr(getattr(model, "config", None), "moe_experts", 0))

    def total_loss(batch: mx.array, mask: mx.array | None = None):
        if not moe:
            return summed_loss(model, batch, streams, mask=mask)
        shards = routed_summed_loss(model, batch, streams, mask=mask)
        ce = sum((s.ce for s in shards), mx.array(0.0))
        aux = sum((s.aux * s.tokens for s in shards), mx.array(0.0))
        load = sum((s.load * s.tokens for s in shards), mx.array(0.0))
        return ce, aux, load

    def masked_loss(batch: mx.array, mask: mx.array):
        return total_loss(batch, mask)

    fn = masked_loss if masked else total_loss
    return mx.compile(fn, inputs=[model.state]) if compile else fn


@dataclass
class EvalResult:
    loss: float
    tokens: int
    bytes: int
    moe_aux: float | None = None  # MoE models: the mean load-balancing loss
    expert_share: list[list[float]] | None = None  # per MoE layer, per expert

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float:
        return self.loss * self.tokens / math.log(2) / max(self.bytes, 1)

    def as_dict(self) -> dict:
        row = {
            "val_loss": self.loss,
            "val_ppl": self.perplexity,
            "val_bpb": self.bits_per_byte,
            "val_tokens": self.tokens,
        }
        if self.moe_aux is not None:
            row.update(val_moe_aux=self.moe_aux, val_expert_share=self.expert_share)
        return row


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
        loss_sum_fn: LossSum,
        rank: int = 0,
        world: int = 1,
    ) -> EvalResult:
        """`loss_sum_fn(batch)` returns the summed next-token loss of a batch (an
        MoE model's, with its routing sums: `LossSum`). With `world` data-parallel
        ranks, each scores batches rank, rank + world, ... and the sums are added
        over the ranks: every rank returns the whole result."""
        sums: list[mx.array] = []  # [loss] or [loss, aux, load]
        for i in range(rank, len(self.batches), world):
            out = self._score(loss_sum_fn, i)
            sums = [a + b for a, b in zip(sums, out)] if sums else out
            mx.eval(sums)  # bound memory: one batch in flight
        if not sums and self.batches:  # no batch for this rank: zeros of the shapes
            sums = [x * 0 for x in self._score(loss_sum_fn, 0)]
        sums = sums or [mx.array(0.0)]
        if world > 1:
            sums = [mx.distributed.all_sum(x) for x in sums]
        loss = sums[0].item() / max(self.tokens, 1)
        result = EvalResult(loss, self.tokens, self.bytes)
        if len(sums) == 3:  # an MoE model: means over every routed token
            routed = max(sum(b.shape[0] * (b.shape[1] - 1) for b in self.batches), 1)
            result.moe_aux = sums[1].item() / routed
            share = (sums[2] / routed).tolist()
            result.expert_share = [[round(f, 6) for f in layer] for layer in share]
        return result

    def _score(self, loss_sum_fn: LossSum, i: int) -> list[mx.array]:
        """[summed loss] of batch i, or an MoE model's [loss, aux, load] sums."""
        args = [mx.array(self.batches[i], dtype=mx.int32)]
        if self.masked:
            args.append(mx.array(self.masks[i]))
        out = loss_sum_fn(*args)
        return list(out) if isinstance(out, (tuple, list)) else [out]
