"""Per-document work for `prepare`: quality filters, the content hash that picks the
split, and encoding; run on batches in worker processes. No MLX or torch here.

`process_batch` turns a batch of texts into one result per text; `BatchRunner.map`
runs it over a stream of batches on N worker processes and yields the results in
input order, with at most 2N batches in flight, so memory stays bounded and the
output does not depend on N. Deduplication needs every hash seen so far and stays
in the caller (`SeenHashes`, 8 bytes per document).
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import signal
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from .tokenizer import Tokenizer
from .tokens import DataError

DEFAULT_MIN_WORDS = 5
DEFAULT_MAX_REPETITION = 0.3


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
    """(split, sha1) of a document: the split depends on its text only."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    val = int.from_bytes(digest[:8], "big") < val_fraction * 2**64
    return ("val" if val else "train"), digest


@dataclass(frozen=True)
class DocResult:
    """reason: why the document is dropped, or None; tokens: [BOS] ids EOS, or
    None when dropped."""

    reason: str | None
    split: str
    digest: bytes
    tokens: np.ndarray | None


@dataclass(frozen=True)
class Job:
    """What every batch is processed with (sent once to each worker)."""

    tokenizer: str
    quality: QualityFilter
    val_fraction: float
    bos: bool


def process_batch(tok: Tokenizer, job: Job, texts: list[str]) -> list[DocResult]:
    """Filter, hash and encode a batch of stripped texts, one result per text."""
    first = [(job.quality.reason(t), *split_of(t, job.val_fraction)) for t in texts]
    keep = [t for t, (reason, _, _) in zip(texts, first, strict=True) if not reason]
    encoded = iter(tok.encode_batch(keep, bos=job.bos, eos=True))
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    return [
        DocResult(
            reason, split, digest, None if reason else np.asarray(next(encoded), dtype)
        )
        for reason, split, digest in first
    ]


class SeenHashes:
    """The duplicate check: a set of 64-bit document hashes held in 8 bytes each
    (a sorted numpy array, plus a small Python set of recent ones merged into it
    now and then), where a Python set of digests costs ~90 bytes per document.
    Two distinct documents share a 64-bit prefix with odds ~n^2 / 2^65 (1e-5 for
    10M documents): then one of them is dropped as a duplicate."""

    def __init__(self, merge_every: int = 1 << 16):
        self._sorted = np.empty(0, np.uint64)
        self._recent: set[int] = set()
        self._merge_every = merge_every

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def in_sorted(self, digests: list[bytes]) -> np.ndarray:
        """Which digests are in the merged part (one vectorised lookup a batch)."""
        keys = np.array([int.from_bytes(d[:8], "big") for d in digests], np.uint64)
        if not len(self._sorted) or not len(keys):
            return np.zeros(len(keys), bool)
        idx = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
        return self._sorted[idx] == keys

    def add(self, digest: bytes, in_sorted: bool = False) -> bool:
        """Add a digest (in_sorted: from `in_sorted` of its batch); False when it
        was already there."""
        key = int.from_bytes(digest[:8], "big")
        if in_sorted or key in self._recent:
            return False
        self._recent.add(key)
        return True

    def end_batch(self) -> None:
        """Merge the recent keys in when there are enough (never mid-batch, where
        `in_sorted` answers would go stale)."""
        if len(self._recent) >= self._merge_every:
            new = np.fromiter(self._recent, np.uint64, len(self._recent))
            # Two sorted runs: the stable sort (timsort) merges them in O(n).
            merged = np.concatenate([self._sorted, np.sort(new)])
            self._sorted = np.sort(merged, kind="stable")
            self._recent.clear()


_WORKER: tuple[Tokenizer, Job] | None = None


def _init_worker(job: Job) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER = (Tokenizer.load(job.tokenizer, threads=1), job)


def _run(texts: list[str]) -> list[DocResult]:
    assert _WORKER is not None, "worker not initialised"
    return process_batch(*_WORKER, texts)


def _context():
    # Not fork: the parent may run threads (tqdm, datasets), and forking a
    # threaded process can deadlock. forkserver starts workers from a clean one.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context(
        "forkserver" if "forkserver" in methods else "spawn"
    )


class BatchRunner:
    """`process_batch` over a stream of batches, in order, on `workers` processes
    (1: in this process, the reference the parallel path must match)."""

    def __init__(self, job: Job, workers: int):
        if workers < 1:
            raise DataError(f"--workers must be >= 1, got {workers}")
        self.job, self.workers = job, workers
        self._local = Tokenizer.load(job.tokenizer, threads=1) if workers == 1 else None
        self._pool = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=_context(),
                initializer=_init_worker,
                initargs=(job,),
            )

    def map(self, batches: Iterable[list[str]]) -> Iterator[list[DocResult]]:
        if self._pool is None:
            for texts in batches:
                yield process_batch(self._local, self.job, texts)
            return
        inflight: collections.deque = collections.deque()
        try:
            for texts in batches:
                inflight.append(self._pool.submit(_run, texts))
                if len(inflight) >= 2 * self.workers:
                    yield inflight.popleft().result()
            while inflight:
                yield inflight.popleft().result()
        except BrokenProcessPool:
            raise DataError(
                "a worker process died (out of memory?); retry with --workers 1"
            ) from None
        finally:
            for f in inflight:
                f.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batched(texts: Iterable[str], n: int, max_chars: int = 1 << 22) -> Iterator[list]:
    """Lists of up to n texts and about max_chars characters (a longer text is a
    batch of its own), so huge documents do not multiply the memory in flight."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= n or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
