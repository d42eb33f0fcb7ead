"""Token generation over a KV cache: layer 1 of the three of `src.inference`.

Layer 1, `generate_step`: prefill the prompt in chunks of `prefill_chunk` tokens
(bounded memory for long prompts), then decode one token per step attending to
the cached keys/values: O(L) work per new token instead of re-running the whole
sequence. The next step is queued (`mx.async_eval`) before the current token is
handed out, so Python overhead overlaps the model's work. Rows of a batch share
one cache and decode in lockstep; prompts in a batch must have the same length.
The cache (`src.inference.cache.KVCache`) has its growth step set to the context,
so it is allocated once, at the first prefill, and never grows or copies.

Layer 2 (text, streaming, batches) is `src.inference.streaming`; layer 3 the CLI
and the REPL.

The window is the model's context: a longer prompt keeps its last tokens (with a
warning) and generation stops when the context is full.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .cache import DecodeRing, DecodeWindow, KVCache, RotatingKVCache, make_cache
from .sampling import Sampling, make_processors, make_sampler

PREFILL_CHUNK = 512
DECODE_BUCKET = 128  # the compiled step attends over windows of this many positions


@dataclass
class Stats:
    """Counts and timings of one generation (filled in by `generate_step`)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0  # the first comes out of the prefill
    prefill_s: float = 0.0
    decode_tokens: int = 0  # the others, over decode_s
    decode_s: float = 0.0

    def summary(self) -> str:
        pre = self.prompt_tokens / max(self.prefill_s, 1e-9)
        dec = self.decode_tokens / max(self.decode_s, 1e-9)
        peak = mx.get_peak_memory() / 2**20
        return (
            f"prompt {self.prompt_tokens} tokens ({pre:,.0f} tok/s prefill), "
            f"generated {self.generated_tokens} tokens ({dec:,.0f} tok/s decode), "
            f"peak memory {peak:,.1f} MiB"
        )


class Decoder:
    """Decode steps (one new token per row) through an `mx.compile`d forward pass.

    Compiling fuses the per-token element-wise work (norms, RoPE, SiLU, residuals)
    and removes most of the graph-building cost of the eager step; decoding small
    models is dominated by that overhead, not by the matmuls. A compiled graph has
    fixed shapes, so attention runs over the first `width` positions of the
    preallocated cache, `width` the position rounded up to `bucket`: one trace per
    window size (at most context / bucket), each used for `bucket` positions.
    The weights are an input of the compiled function (`inputs=model.state`), so
    a model trained or quantized between calls is seen as it is."""

    def __init__(self, model: nn.Module, bucket: int = DECODE_BUCKET):
        self.model, self.bucket = model, bucket
        self._steps: dict[int, object] = {}

    @classmethod
    def of(cls, model: nn.Module) -> Decoder:
        """The model's decoder, made at first use and kept (its traces with it)."""
        if not isinstance(getattr(model, "_decoder", None), cls):
            model._decoder = cls(model)  # a plain attribute, not a parameter
        return model._decoder

    @staticmethod
    def fits(cache: list) -> bool:
        """Whether the compiled step can run on `cache`: our caches, allocated,
        with room left in the global layers' buffers."""
        return all(
            (
                isinstance(c, KVCache)
                and c.keys is not None
                and c.offset < c.keys.shape[2]
            )
            or (isinstance(c, RotatingKVCache) and c.keys is not None)
            for c in cache
        )

    def __call__(self, tokens: mx.array, cache: list) -> mx.array:
        """Logits (B, V) of `tokens` (B, 1) at the cache's offset; advances the cache.
        Local layers' rings are attended whole; only the global layers' width
        follows the position (a model without global layers has one trace)."""
        c0 = cache[0]
        full = [c.keys.shape[2] for c in cache if isinstance(c, KVCache)]
        width = min(self.bucket * (c0.offset // self.bucket + 1), *full) if full else 0
        step = self._steps.get(width)
        if step is None:
            step = mx.compile(self._forward(width), inputs=self.model.state)
            self._steps[width] = step
        pad = [] if c0.pad is None else [c0.pad]
        keys, values = [c.keys for c in cache], [c.values for c in cache]
        logits, keys, values = step(tokens, mx.array(c0.offset), keys, values, pad)
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values, c.offset = k, v, c.offset + 1
        return logits

    def _forward(self, width: int):
        windows = [layer.self_attn.window for layer in self.model.model.layers]

        def forward(tokens, offset, keys, values, pad):
            pad = pad[0] if pad else None
            views = [
                DecodeWindow(k, v, offset, width, pad)
                if w is None
                else DecodeRing(k, v, offset, pad)
                for w, k, v in zip(windows, keys, values)
            ]
            logits = self.model(tokens, cache=views)[:, -1, :]
            return logits, [w.keys for w in views], [w.values for w in views]

        return forward


def fit_prompt(ids: Sequence[int], context: int, reserve: int = 0) -> list[int]:
    """The last `context - reserve` tokens of `ids`, warning when that cuts it."""
    keep = max(context - reserve, 1)
    if len(ids) > keep:
        print(
            f"warning: the prompt has {len(ids)} tokens; keeping its last {keep} "
            f"(context {context})",
            file=sys.stderr,
        )
        return list(ids[-keep:])
    return list(ids)


def prefill(model: nn.Module, tokens: mx.array, cache: list, chunk: int) -> mx.array:
    """Run tokens (B, L) through the model into `cache`; logits (B, V) of the last.

    All but the last token go in chunks whose logits are never evaluated (lazy
    graphs: the LM head is skipped); the last token alone gives the logits."""
    while tokens.shape[1] > 1:
        n = min(chunk, tokens.shape[1] - 1)
        model(tokens[:, :n], cache=cache)
        mx.eval([(c.keys, c.values) for c in cache])
        tokens = tokens[:, n:]
    return model(tokens, cache=cache)[:, -1, :]


def generate_step(
    model: nn.Module,
    prompt: mx.array,
    sampling: Sampling,
    cache: list | None,
    history: mx.array | None = None,
    max_new_tokens: int | None = None,
    stats: Stats | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    compiled: bool = True,
    n_vocab: int | None = None,
) -> Iterator[mx.array]:
    """Yield next-token arrays (B,) continuing `prompt` (B, L) on top of `cache`.

    `history` (B, T) is every token the cache and prompt hold, for the penalties
    (default: the prompt). Decode steps run through `Decoder` (compiled) unless
    `compiled=False`; `cache=None` re-runs the whole sequence every step. Both are
    the slow references the fast path is tested against. The caller stops on EOS;
    this stops after `max_new_tokens` (default `sampling.max_tokens`). Ids at or
    above `n_vocab` (the tokenizer's size, when the embedding has more rows) are
    never chosen: the tokenizer could not decode them."""
    n_new = sampling.max_tokens if max_new_tokens is None else max_new_tokens
    sampler = make_sampler(sampling, model.config.vocab_size)
    processors = make_processors(sampling)
    hist = prompt if history is None else history
    key = mx.random.key(sampling.seed)
    draws = sampling.temperature > 0  # greedy needs no random key
    keep_history = bool(processors) or cache is None
    stats = stats or Stats()
    pad = getattr(cache[0], "pad", None) if cache else None  # padding: not prompt
    stats.prompt_tokens += prompt.size - (int(pad.sum()) if pad is not None else 0)

    rows = model.config.vocab_size
    unused = mx.arange(rows) >= n_vocab if n_vocab and n_vocab < rows else None

    def pick(logits: mx.array, hist: mx.array, key: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        if unused is not None:
            logits = mx.where(unused, -mx.inf, logits)
        for proc in processors:  # penalties take one row's history
            rows = [proc(hist[i], logits[i : i + 1]) for i in range(len(hist))]
            logits = mx.concatenate(rows)
        return sampler(logits, key)

    if n_new <= 0:
        return
    t0 = time.perf_counter()
    if cache is None:
        logits = model(hist)[:, -1, :]
    else:
        logits = prefill(model, prompt, cache, prefill_chunk)
    fast = compiled and cache is not None and Decoder.fits(cache)
    decoder = Decoder.of(model) if fast else None
    key, sub = mx.random.split(key) if draws else (key, key)
    y = pick(logits, hist, sub)
    mx.eval(y)
    t1 = time.perf_counter()
    stats.prefill_s += t1 - t0
    for n in range(n_new):
        if n + 1 < n_new:  # queue the next step before handing this token out
            if keep_history:
                hist = mx.concatenate([hist, y[:, None]], axis=1)
            if draws:
                key, sub = mx.random.split(key)
            if decoder:
                logits = decoder(y[:, None], cache)
            else:
                window = y[:, None] if cache is not None else hist
                logits = model(window, cache=cache)[:, -1, :]
            next_y = pick(logits, hist, sub)
            mx.async_eval(next_y)
        stats.generated_tokens += y.shape[0]
        if n > 0:  # summed over calls, so one Stats can follow several batches
            stats.decode_tokens += y.shape[0]
            stats.decode_s += time.perf_counter() - t1
            t1 = time.perf_counter()
        yield y
        y = next_y if n + 1 < n_new else y


def generate_tokens(
    model: nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos_id: int | None = None,
    use_cache: bool = True,
    sampling: Sampling | None = None,
    reserve: int = 0,
    stats: Stats | None = None,
    n_vocab: int | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids continuing `prompt`, stopping before EOS
    and when the context is full. `sampling` overrides temperature and seed.

    An empty prompt starts from EOS (the document separator in training data). An
    over-long prompt keeps its last `context - reserve` tokens with a warning."""
    context = model.config.context_length
    start = [eos_id if eos_id is not None else 0]
    tokens = fit_prompt(prompt, context, reserve) or start
    s = sampling or Sampling(temperature=temperature, seed=seed)
    n_new = min(max_new_tokens, context - len(tokens))
    cache = make_cache(model) if use_cache else None
    steps = generate_step(
        model, mx.array([tokens]), s, cache, None, n_new, stats, n_vocab=n_vocab
    )
    for y in steps:
        token = y.item()
        if token == eos_id:
            return
        yield token
