"""Text on top of the token engine (layer 2 of three): a streamer that turns token
ids into text deltas, and completion of prompts one at a time or in batches.

`TextStreamer` never splits a multi-byte character (byte-fallback tokens decode to
U+FFFD until their character is complete) and never shows the start of a stop
string. A batch may hold prompts of different token counts: shorter ones are
left-padded and the cache masks the padding (`src.inference.cache.KVCache`), so a row
computes what it would alone, up to float rounding. With temperature > 0 a
batched row draws other random numbers than it would alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import mlx.core as mx

from ..errors import UserError, utf8_problem
from .cache import make_cache
from .generate import Stats, fit_prompt, generate_step
from .sampling import Sampling

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 byte sequence gives


class TextStreamer:
    """Turn token ids into text deltas as they come.

    Text is decoded from the tokens since the last clean point (plus one anchor
    token, so the decoder sees the same neighbourhood) and held back while it ends
    in an incomplete character or in the beginning of a stop string. Once a stop
    string appears, `stopped` is set and nothing after it is ever returned."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.text, self.stopped = "", False
        self._anchor: list[int] = []
        self._seg: list[int] = []
        self._held = ""  # decoded, not yet returned (a possible stop-string start)

    def _decode_seg(self) -> str:
        text = self.tok.decode(self._anchor + self._seg)
        return text[len(self.tok.decode(self._anchor)) :]

    def add(self, token: int) -> str:
        """The new text that `token` completes ('' while a character is open)."""
        if self.stopped:
            return ""
        self._seg.append(token)
        text = self._decode_seg()
        if text.endswith(REPLACEMENT):
            return ""
        self._seg, last = [], self._seg[-1]
        self._anchor = [] if REPLACEMENT in self.tok.decode([last]) else [last]
        return self._push(text)

    def finish(self) -> str:
        """Whatever is still held (an unfinished character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        out = self._push(self._decode_seg()) if self._seg else ""
        if not self.stopped:
            out, self.text = out + self._held, self.text + self._held
        self._seg, self._held = [], ""
        return out

    def _push(self, new: str) -> str:
        buf = self._held + new
        hits = [(buf.find(s), s) for s in self.stop if s in buf]
        if hits:
            cut = min(hits)[0]
            out, self._held, self.stopped = buf[:cut], "", True
        else:
            hold = max(
                (k for s in self.stop for k in range(1, len(s)) if buf.endswith(s[:k])),
                default=0,
            )
            out, self._held = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out


def prompt_ids(tokenizer, text: str, context: int, s: Sampling) -> list[int]:
    """Token ids of a prompt: EOS (a document start) when empty; an over-long one
    keeps its last tokens, leaving room for min(max_tokens, context/2) new ones."""
    reserve = min(s.max_tokens, context // 2)
    return fit_prompt(tokenizer.encode(text), context, reserve) or [tokenizer.eos_id]


def run_rows(model, tokenizer, rows, s: Sampling, stats: Stats, on_text=None):
    """Complete prompts `rows` as one batch (left-padded to the longest);
    [(text, n_tokens)]. A row ends at EOS or a stop string; `on_text(row, delta)`
    streams as text comes."""
    width = max(len(r) for r in rows)
    n_new = min(s.max_tokens, model.config.context_length - width)
    pads = [width - len(r) for r in rows]
    padded = mx.array([[tokenizer.pad_id] * p + r for p, r in zip(pads, rows)])
    cache = make_cache(model, mx.array(pads) if any(pads) else None)
    streamers = [TextStreamer(tokenizer, s.stop) for _ in rows]
    counts, done = [0] * len(rows), [False] * len(rows)
    steps = generate_step(
        model, padded, s, cache, None, n_new, stats, n_vocab=tokenizer.vocab_size
    )
    for y in steps:
        for r, token in enumerate(y.tolist()):
            if done[r] or token == tokenizer.eos_id:
                done[r] = True
                continue
            counts[r] += 1
            if (delta := streamers[r].add(token)) and on_text:
                on_text(r, delta)
            done[r] = streamers[r].stopped
        if all(done):
            break
    for r, st in enumerate(streamers):
        if (delta := st.finish()) and on_text:
            on_text(r, delta)
    return [(st.text, n) for st, n in zip(streamers, counts)]


def complete_prompts(
    model, tokenizer, prompts: list[str], s: Sampling, batch: int, stats: Stats
) -> Iterator[dict]:
    """One dict per prompt (prompt, completion, token counts, seconds), yielded in
    the prompts' order as soon as it is made: `batch` consecutive prompts are
    generated together (shorter ones left-padded), so a caller can write each
    result before the next batch starts (an interruption loses only the batch
    in progress)."""
    context = model.config.context_length
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]
        ids = [prompt_ids(tokenizer, p, context, s) for p in group]
        t0 = time.perf_counter()
        out = run_rows(model, tokenizer, ids, s, stats)
        seconds = round(time.perf_counter() - t0, 4)
        for prompt, row, (text, n) in zip(group, ids, out):
            yield dict(prompt=prompt, completion=text, prompt_tokens=len(row),
                       generated_tokens=n, seconds=seconds,
                       batch_size=len(group))  # fmt: skip


def check_utf8(text: str, what: str) -> str:
    """`text`, or UserError naming `what` when it is not valid UTF-8 (a byte that
    did not decode, kept by Python as a lone surrogate: no tokenizer takes it)."""
    if why := utf8_problem(text):
        raise UserError(f"{what} is {why}")
    return text
