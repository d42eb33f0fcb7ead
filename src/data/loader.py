"""The training loader: random training windows and fixed validation windows of
a token file (`src.data.tokens`). No MLX or torch here.

Loader contract: `TokenLoader` opens the file once and checks it fully up front
(header, size, every id < the model's vocab_size, the tokenizer named in the
header and in meta.json) and raises DataError naming the file; from then on it
reads that open file, so a file renamed over the path (as `prepare` writes) or
deleted does not change what the run reads, and a file changed in place (size or
mtime) stops the run with a DataError rather than feed it unchecked ids. Each
batch is gathered from a fresh numpy memmap of that open file, dropped when the
batch is made (one long-lived map keeps every touched page resident and RSS grows
over a run: the nanoGPT lesson); the size and mtime are checked before each map.
A file truncated in place in the instant between that check and the read would
still fault the process (SIGBUS): rewriting a token file in place is never safe.

A training batch is (batch_size, context_length + 1) int32 windows (inputs
w[:-1], targets w[1:]) starting at offsets drawn from
`np.random.default_rng([seed, step])`: a pure function of (seed, step), so a
run's data position is just its step (exact resume). Validation windows are
fixed, non-overlapping and in file order.

`prepare` writes a meta.json sidecar beside the token files (document counts,
tokenizer sha256, source). When it is there the loader checks it too: its token
count must match the header, and with `tokenizer_sha256` given, the tokenizer.

Assistant masks (`prepare --chat`, one byte per token beside X.bin) are
`src.data.masks`'s; the loader opens the one meta.json names with its token file
and cuts its windows at the same offsets.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import DataError
from .masks import MaskFile
from .tokens import DATASET_META, _open, _validate, check_sidecar


class TokenLoader:
    """Random training windows and fixed validation windows of a token file.

    A window is context_length + 1 tokens: inputs w[:-1], targets w[1:].
    tokenizer_sha256: when given, a file whose header or meta.json sidecar names
    another tokenizer is refused. The file is opened once and read from that
    descriptor (see the module docstring); `close` releases it (so does garbage
    collection).
    """

    def __init__(
        self,
        path: str | Path,
        context_length: int,
        vocab_size: int,
        tokenizer_sha256: str | None = None,
    ):
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.path, self.context_length = Path(path), context_length
        self.vocab_size = vocab_size
        self._fd = _open(self.path)
        self._closer = weakref.finalize(self, os.close, self._fd)
        # what np.memmap maps (it seeks this object; os.pread ignores the offset)
        self._file = open(self._fd, "rb", buffering=0, closefd=False)
        try:
            self._identity = self._stat()  # what later reads must still see
            self.header = _validate(
                self._fd, self.path, vocab_size, context_length, tokenizer_sha256
            )
            self._check_unchanged()  # not changed while it was scanned
            self.meta = check_sidecar(self.path, self.header, tokenizer_sha256)
            self.mask = self._open_mask()
        except BaseException:
            self.close()
            raise

    def _open_mask(self) -> MaskFile | None:
        """The assistant mask meta.json names for this file (None: none)."""
        name = (self.meta or {}).get("mask_file")
        if name is None:
            return None
        if not isinstance(name, str) or Path(name).name != name or not name:
            raise DataError(
                f"{self.path.parent / DATASET_META}: mask_file {name!r} is not a file "
                "name beside the token file; re-run prepare --chat"
            )
        return MaskFile(
            self.path.parent / name,
            self.n_tokens,
            self.path,
            self.path.parent / DATASET_META,
        )

    @property
    def has_mask(self) -> bool:
        """Whether the file has an assistant mask (chat data, `prepare --chat`)."""
        return getattr(self, "mask", None) is not None

    def close(self) -> None:
        """Release the file (idempotent; reads fail after it)."""
        self._closer()
        if self.has_mask:
            self.mask.close()

    @property
    def n_tokens(self) -> int:
        return self.header.n_tokens

    def _stat(self) -> tuple[int, int]:
        st = os.fstat(self._fd)
        return st.st_size, st.st_mtime_ns

    def _check_unchanged(self) -> None:
        """DataError when the open file was written to since it was checked (a
        file renamed over the path is another file: it changes nothing here)."""
        now = self._stat()
        if now != self._identity:
            raise DataError(
                f"{self.path}: changed in place while in use ({self._identity[0]} "
                f"-> {now[0]} bytes, or rewritten); stopping rather than read data "
                "that was not checked. Never rewrite a token file in place: write "
                "a new one and rename it over the old (as prepare does)"
            )

    def _windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) int32: tokens[s : s + length] for each start,
        gathered from a fresh memory map of the open file (dropped at return)."""
        self._check_unchanged()
        h = self.header
        try:
            tokens = np.memmap(self._file, h.dtype, "r", h.offset, (h.n_tokens,))
        except ValueError:  # mmap: the file is now shorter than its header says
            self._check_unchanged()
            raise DataError(f"{self.path}: truncated while in use") from None
        out = np.asarray(tokens[starts[:, None] + np.arange(length)], np.int32)
        del tokens  # unmapped here: no page stays resident between batches
        if out.size and out.max() >= self.vocab_size:  # written to under our read
            self._check_unchanged()
            raise DataError(
                f"{self.path}: token id {out.max()} >= vocab_size "
                f"{self.vocab_size}: the file changed while in use"
            )
        return out

    def _masks(self, starts: np.ndarray, length: int) -> np.ndarray:
        if not self.has_mask:
            raise DataError(
                f"{self.path}: no assistant mask (prepare --chat makes one)"
            )
        return self.mask.take(starts, length)

    def batch(
        self,
        seed: int,
        step: int,
        batch_size: int,
        rows: slice = slice(None),
        with_mask: bool = False,
    ):
        """(batch_size, context_length + 1) int32, a pure function of (seed, step);
        only `rows` of it are read and returned (a data-parallel rank's share).
        with_mask: (those windows, their assistant masks as bool)."""
        if min(seed, step) < 0 or batch_size < 1:
            raise ValueError(f"bad seed {seed}, step {step} or batch_size {batch_size}")
        L = self.context_length
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.n_tokens - L, size=batch_size)[rows]  # start+L<n
        windows = self._windows(starts, L + 1)
        return (windows, self._masks(starts, L + 1)) if with_mask else windows

    def num_val_windows(self, max_tokens: int | None = None) -> int:
        """Windows needed to cover max_tokens targets (None: the whole file)."""
        available = (self.n_tokens - 1) // self.context_length
        if max_tokens is None:
            return available
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        return min(available, -(-max_tokens // self.context_length))

    def val_batches(
        self, batch_size: int, max_tokens: int | None = None, with_mask: bool = False
    ) -> Iterator:
        """Windows i = tokens[i*L : i*L+L+1] from the file start, in order, until
        max_tokens targets are covered; the last batch may be smaller. with_mask:
        (windows, their assistant masks as bool) pairs."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        L, n = self.context_length, self.num_val_windows(max_tokens)
        for first in range(0, n, batch_size):
            rows = np.arange(first, min(first + batch_size, n))
            # one read of the span the windows cover (they share their end tokens)
            cut = rows[:, None] * L - first * L + np.arange(L + 1)
            span = self._windows(rows[:1] * L, len(rows) * L + 1)[0]
            if with_mask:
                yield span[cut], self._masks(rows[:1] * L, len(rows) * L + 1)[0][cut]
            else:
                yield span[cut]
