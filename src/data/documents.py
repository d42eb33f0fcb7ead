"""Per-document work for `prepare`: quality filters, the content key that picks
the split and finds duplicates, and encoding. No MLX or torch here.

`encode_documents` turns a list of texts into one `Encoded` batch: a drop reason,
a 64-bit content key and a token count per document, and the tokens of all kept
documents in one array. A batch is four numpy arrays, so it crosses process
boundaries as a few buffers rather than an object per document (`src.data.workers`
runs it on N processes). Deduplication needs every key seen so far and stays in
the parent (`SeenHashes`, 8 bytes per document).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..tokenizer.kinds import TokenizerLike
from .tokens import token_dtype

DEFAULT_MIN_WORDS = 5
DEFAULT_MAX_REPETITION = 0.3
REASONS = ("empty", "too_short", "repetitive")  # reason codes 1, 2, 3; 0: kept
_CODES = {None: 0, **{r: i for i, r in enumerate(REASONS, 1)}}


def repetition(text: str) -> float:
    """Share of the text's characters that only repeat what came before, in [0, 1]:
    the larger of (a) the characters of non-blank lines that repeat an earlier line
    and (b) the characters of the repeat occurrences of the most frequent word
    bigram (lower-cased). Prose scores < 0.2; "ha ha ha ha" scores 1.0."""
    lines = [s for line in text.splitlines() if (s := line.strip())]
    seen: set[str] = set()
    dup = 0
    for line in lines:
        if line in seen:
            dup += len(line)
        seen.add(line)
    by_lines = dup / max(1, sum(map(len, lines)))
    words = text.lower().split()
    if len(words) < 3:
        return by_lines
    (a, b), n = Counter(zip(words, words[1:])).most_common(1)[0]
    by_bigram = (n - 1) * (len(a) + len(b)) / sum(map(len, words))
    return min(1.0, max(by_lines, by_bigram))


@dataclass(frozen=True)
class QualityFilter:
    """min_words: drop documents with fewer words (0: keep all); max_repetition:
    drop documents whose `repetition` exceeds it (1.0: keep all)."""

    min_words: int = DEFAULT_MIN_WORDS
    max_repetition: float = DEFAULT_MAX_REPETITION

    def reason(self, text: str) -> str | None:
        """Why `text` is dropped ("empty", "too_short", "repetitive") or None."""
        if not text:
            return "empty"
        if self.min_words:
            if len(text.split(maxsplit=self.min_words)) < self.min_words:
                return "too_short"
        if self.max_repetition < 1.0 and repetition(text) > self.max_repetition:
            return "repetitive"
        return None


def split_of(text: str, val_fraction: float) -> tuple[str, bytes]:
    """(split, sha1) of a document: the split depends on its text only. The
    reference for `content_keys` + `is_val`."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    val = int.from_bytes(digest[:8], "big") < val_fraction * 2**64
    return ("val" if val else "train"), digest


def content_keys(texts: list[str]) -> np.ndarray:
    """The first 8 bytes of each text's sha1, read big-endian, as uint64."""
    raw = b"".join([hashlib.sha1(t.encode("utf-8")).digest()[:8] for t in texts])
    return np.frombuffer(raw, ">u8").astype(np.uint64)


def is_val(keys: np.ndarray, val_fraction: float) -> np.ndarray:
    """keys < val_fraction * 2**64, exactly (a float64 cast of a key would round)."""
    return keys < np.uint64(math.ceil(val_fraction * 2**64))


@dataclass(frozen=True)
class Job:
    """What every batch is processed with (sent once to each worker)."""

    tokenizer: str
    quality: QualityFilter
    bos: bool


@dataclass(frozen=True)
class Encoded:
    """A batch of n documents. reasons: uint8 [n], 0 for kept, else 1 + the index
    in REASONS; keys: uint64 [n] (`content_keys`); lengths: int64 [n], tokens of
    each document, 0 when dropped; tokens: [BOS] ids EOS of each kept document,
    one after the other."""

    reasons: np.ndarray
    keys: np.ndarray
    lengths: np.ndarray
    tokens: np.ndarray


def encode_documents(tok: TokenizerLike, job: Job, texts: list[str]) -> Encoded:
    """Filter, hash and encode a batch of stripped texts."""
    codes = [_CODES[job.quality.reason(t)] for t in texts]
    ids = tok.encode_batch(
        [t for t, c in zip(texts, codes, strict=True) if not c], bos=job.bos, eos=True
    )
    reasons = np.array(codes, np.uint8)
    lengths = np.zeros(len(texts), np.int64)
    lengths[reasons == 0] = [len(x) for x in ids]
    dtype = token_dtype(tok.vocab_size)
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype, lengths.sum())
    return Encoded(reasons, content_keys(texts), lengths, tokens)


def assistant_mask(
    tokens: np.ndarray, assistant_id: int, end_id: int, closers: tuple[int, ...]
) -> np.ndarray:
    """uint8 per token of whole chat documents (`src.template.CHAT`): 1 for the
    tokens of each reply, from the one after `<|assistant|>` up to and including
    the `<|end|>` that ends it; 0 for system and user turns, the `<|assistant|>`
    marker itself and the `closers` (EOS, BOS). A token is in a reply when the
    last `<|assistant|>` before it comes after the last `<|end|>` or closer before
    it, so a conversation ending on an open `<|assistant|>` leaks nothing past
    its EOS. Markers are single tokens (`prepare --chat` checks), so the ids
    alone find the turns; O(n) numpy."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return np.zeros(0, np.uint8)
    pos = np.arange(len(tokens))
    boundary = np.isin(tokens, closers)
    opened = np.where(tokens == assistant_id, pos, -1)
    closed = np.where((tokens == end_id) | boundary, pos, -1)
    # the last opener / closer strictly before each position
    last_open = np.maximum.accumulate(np.concatenate([[-1], opened[:-1]]))
    last_close = np.maximum.accumulate(np.concatenate([[-1], closed[:-1]]))
    return ((last_open > last_close) & ~boundary).astype(np.uint8)


class SeenHashes:
    """The duplicate check: every key kept so far in 8 bytes (a large sorted numpy
    array plus a small sorted one of recent keys, merged into it now and then),
    where a Python set of digests costs ~90 bytes per document. Two distinct
    documents share a 64-bit key with odds ~n^2 / 2^65 (1e-5 for 10M documents):
    then one of them is dropped as a duplicate."""

    def __init__(self, merge_every: int = 1 << 16):
        self._sorted = np.empty(0, np.uint64)
        self._recent = np.empty(0, np.uint64)
        self._merge_every = merge_every

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def _known(self, keys: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(keys), bool)
        for part in (self._sorted, self._recent):
            if len(part):
                idx = np.minimum(np.searchsorted(part, keys), len(part) - 1)
                hit |= part[idx] == keys
        return hit

    def add(self, keys: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Add keys[where], in order; return a mask over keys, True where a key is
        new: not seen before, and not earlier in this batch."""
        at = np.flatnonzero(where)
        uniq, first = np.unique(keys[at], return_index=True)  # first occurrences
        fresh = ~self._known(uniq)
        new = np.zeros(len(keys), bool)
        new[at[first[fresh]]] = True
        self._recent = _merge(self._recent, uniq[fresh])
        if len(self._recent) >= self._merge_every:
            self._sorted = _merge(self._sorted, self._recent)
            self._recent = np.empty(0, np.uint64)
        return new


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two sorted arrays -> one: a stable sort merges two sorted runs in O(n),
    in place, so the peak is ~2.5x the result rather than 3.5x."""
    out = np.concatenate([a, b])
    out.sort(kind="stable")
    return out
