"""Token generation over a KV cache (the engine under samples, inference and chat).

`generate_tokens` prefills the prompt in one pass, then decodes one token per step,
each step attending to the cached keys/values: O(L) work per new token instead of
re-running the whole sequence. The window is the model's context: a longer prompt
keeps its last tokens, and generation stops when the context is full.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn


def sample(
    logits: mx.array, temperature: float, key: mx.array | None = None
) -> mx.array:
    """Next token ids from logits (B, vocab): greedy when temperature == 0."""
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(logits * (1.0 / temperature), key=key)


def generate_tokens(
    model: nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids continuing `prompt`.

    `use_cache=False` recomputes the whole window every step: the slow reference
    the cached path is tested against."""
    context = model.config.context_length
    tokens = list(prompt)[-context:] or [eos_id if eos_id is not None else 0]
    room = context - len(tokens)
    key = mx.random.key(seed)
    cache = model.make_cache() if use_cache else None
    pending = tokens
    for _ in range(min(max_new_tokens, room)):
        window = pending if use_cache else tokens
        logits = model(mx.array(window)[None], cache=cache)[:, -1, :]
        key, subkey = mx.random.split(key)
        token = sample(logits.astype(mx.float32), temperature, subkey).item()
        if token == eos_id:
            return
        yield token
        tokens.append(token)
        pending = [token]
