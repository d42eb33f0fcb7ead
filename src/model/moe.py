"""Mixture of experts: an FFN made of `model.moe_experts` (E) experts, each an MLP
of the model's kind (`model.mlp`, width `ffn_dim`), of which a router picks
`model.moe_top_k` (k) per token.

Routing (Mixtral's, and Qwen3-MoE's with norm_topk_prob, so the export computes
the same): router logits = gate(x) (a Linear d -> E, no bias); probabilities =
softmax of the logits in fp32; each token goes to the k most probable experts,
weighted by their probabilities renormalised to sum to 1; y = sum of the k
weighted expert outputs.

The experts are one batched computation, not a loop per expert: the N*k
(token, expert) assignments are sorted by expert and every projection is one
`mx.gather_mm` over the stacked weights (E, out, in), which multiplies each block
of rows by its expert's matrix. Blocks of b rows (`block_rows`: up to 64 when
there are many assignments, as in training and prefill; 1 when decoding): each
expert's rows are padded with zero rows to a multiple of b, so a block never
mixes experts, and gather_mm does one small matrix product per block rather than
one vector product per row (much faster on the CPU backend). The outputs are put
back in token order. Cost: k experts'
FLOPs per token plus at most E*(b-1) padding rows, the router (d*E) and a sort
of N*k indices.

Load balancing (Switch Transformer): aux = E * sum_e f_e * P_e, f_e the share of
the N*k assignments routed to expert e, P_e the mean router probability of e over
the N tokens; 1.0 when both are uniform, E when one expert takes everything.
Only P carries a gradient (f counts). The training loss adds
`training.moe_aux_loss` times the mean of aux over the MoE layers
(`src.model.loss`).

Weights, stacked per expert (`Experts`): `mlp.gate.weight` (E, d) is the router;
`mlp.experts.{gate,up,down}_proj.weight` (E, out, in) hold expert e's Linear
weights at [e] (gate_proj only for the gated kinds). Exporting expert e is
slicing [e]: Qwen3-MoE's `mlp.experts.{e}.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.{e}.w1/w3/w2.weight` (`src.convert.hf`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig


class Routing(NamedTuple):
    """What one MoE layer's router did on a batch (the training loss and the
    validation log read it)."""

    aux: mx.array  # () the load-balancing loss E * sum_e f_e * P_e
    load: mx.array  # (E,) f: each expert's share of the top-k assignments


def route(logits: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """(probabilities (N, E) fp32, expert indices (N, k), weights (N, k) fp32
    summing to 1 per token) for router logits (N, E): softmax in fp32, the k
    most probable experts (in no particular order), their probabilities
    renormalised."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    top = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k])
    weights = mx.take_along_axis(probs, top, axis=-1)
    return probs, top, weights / weights.sum(axis=-1, keepdims=True)


def balance(probs: mx.array, top: mx.array) -> Routing:
    """The load-balancing loss and per-expert load of one routing (see the
    module docstring): probs (N, E) fp32, top (N, k)."""
    E = probs.shape[-1]
    hits = top[..., None] == mx.arange(E)  # (N, k, E) one-hot assignments
    load = mx.stop_gradient(hits.astype(mx.float32).mean(axis=(0, 1)))  # f, sums to 1
    return Routing(E * (load * probs.mean(axis=0)).sum(), load)


def block_rows(assignments: int, experts: int) -> int:
    """Rows per gather_mm block: a power of two up to 64, small enough that the
    padding (at most experts * (b - 1) rows) stays under a quarter of the rows."""
    b = 1
    while b < 64 and 2 * b * experts * 4 <= assignments:
        b *= 2
    return b


class StackedLinear(nn.Module):
    """E bias-free Linear layers in one weight (E, out, in); block i of the
    input goes through layer `experts[i]`."""

    def __init__(self, n: int, dims_in: int, dims_out: int):
        super().__init__()
        self.weight = mx.zeros((n, dims_out, dims_in))  # the model initialises it

    def __call__(self, x: mx.array, experts: mx.array) -> mx.array:
        """x (blocks, b, in), experts (blocks,) sorted -> (blocks, b, out)."""
        w = self.weight.swapaxes(-1, -2)  # (E, in, out)
        return mx.gather_mm(x, w, rhs_indices=experts, sorted_indices=True)


class Experts(nn.Module):
    """E MLPs of one kind, batched: gated down(act(gate(x)) * up(x)), plain
    down(act(up(x)))."""

    def __init__(self, cfg: ModelConfig, act: Callable[[mx.array], mx.array]):
        super().__init__()
        E, d, f = cfg.moe_experts, cfg.d_model, cfg.ffn_dim
        if cfg.gated:
            self.gate_proj = StackedLinear(E, d, f)
        self.up_proj = StackedLinear(E, d, f)
        self.down_proj = StackedLinear(E, f, d)
        self.act = act

    def __call__(self, x: mx.array, top: mx.array) -> mx.array:
        """x (N, D), top (N, k) -> each token's k expert outputs (N, k, D)."""
        (N, k), D = top.shape, x.shape[-1]
        E, M = self.up_proj.weight.shape[0], N * k
        flat = top.flatten()  # assignment j is token j // k
        order = mx.argsort(flat)  # assignments grouped by expert
        experts = flat[order]
        xs = x[order // k]  # (M, D)
        b = block_rows(M, E)
        if b == 1:  # a block per row, no padding
            y = self._mlp(xs[:, None, :], experts)[:, 0]
        else:  # sorted row i goes to padded row slot[i]; blocks of b rows
            count = (flat[:, None] == mx.arange(E)).sum(axis=0)  # (E,)
            padded = (count + b - 1) // b * b
            end = mx.cumsum(padded)
            offset = (end - padded) - (mx.cumsum(count) - count)
            slot = offset[experts] + mx.arange(M)  # (M,)
            rows = -(-(M + E * (b - 1)) // b) * b  # enough for any routing
            xp = mx.zeros((rows, D), dtype=x.dtype).at[slot].add(xs)
            start = mx.arange(rows // b)[:, None] * b
            block = mx.minimum((end[None, :] <= start).sum(axis=1), E - 1)
            y = self._mlp(xp.reshape(-1, b, D), block).reshape(rows, D)[slot]
        return y[mx.argsort(order)].reshape(N, k, D)  # back in assignment order

    def _mlp(self, x: mx.array, experts: mx.array) -> mx.array:
        """Blocks x (blocks, b, D) through experts (blocks,) -> (blocks, b, D)."""
        h = self.up_proj(x, experts)
        if "gate_proj" in self:
            h = self.act(self.gate_proj(x, experts)) * h
        else:
            h = self.act(h)
        return self.down_proj(h, experts)


class MoE(nn.Module):
    """The routed FFN: `mlp.gate` (the router) and `mlp.experts`."""

    def __init__(self, cfg: ModelConfig, act: Callable[[mx.array], mx.array]):
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.gate = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.experts = Experts(cfg, act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.routed(x)[0]

    def routed(self, x: mx.array) -> tuple[mx.array, Routing]:
        """(y (B, L, D), this batch's Routing) for x (B, L, D)."""
        B, L, D = x.shape
        flat = x.reshape(-1, D)  # (N, D)
        probs, top, weights = route(self.gate(flat), self.top_k)
        y = self.experts(flat, top)  # (N, k, D)
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=1)
        return y.reshape(B, L, D), balance(probs, top)
