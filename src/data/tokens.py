"""Token files and the memmap training loader. No MLX or torch here.

File format (little-endian): a 32-byte header, then the token ids.

    offset  size  field
         0     8  magic       b"SLMTOKS\\0"
         8     4  version     1
        12     4  itemsize    2 (uint16, when vocab_size <= 65536) or 4 (uint32)
        16     8  n_tokens
        24     4  vocab_size  every id is in [0, vocab_size)
        28     4  reserved    0

The file size is exactly 32 + n_tokens * itemsize. Files are written atomically
(temp file, fsync, rename), so a reader never sees half a file.

Loader contract: `TokenLoader` validates the whole file up front (header, size, every
id < the model's vocab_size) and raises DataError naming the file. A training batch
is (batch_size, context_length + 1) int32 windows (inputs w[:-1], targets w[1:])
starting at offsets drawn from `np.random.default_rng([seed, step])`: a pure function
of (seed, step), so a run's data position is just its step (exact resume).
Validation windows are fixed, non-overlapping and in file order.

`prepare` writes a meta.json sidecar beside the token files (document counts,
tokenizer sha256, source). When it is there the loader checks it too: its token
count must match the header, and with `tokenizer_sha256` given, the tokenizer.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError
from ..files import atomic_file

MAGIC = b"SLMTOKS\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIQII")  # magic, version, itemsize, n_tokens, vocab, 0
HEADER_SIZE = HEADER.size  # 32
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
SCAN_CHUNK = 4 * 1024 * 1024  # tokens per np.max when scanning for bad ids
DATASET_META = "meta.json"


@dataclass(frozen=True)
class TokenFileHeader:
    version: int
    itemsize: int
    n_tokens: int
    vocab_size: int

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.itemsize]


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest id type for a vocabulary: uint16 up to 65,536 tokens, else
    uint32 (token files, and the arrays that fill them, use it)."""
    return DTYPES[2 if vocab_size <= 65536 else 4]


class TokenWriter:
    """Append token chunks to a seekable binary file; `finish` writes the header."""

    def __init__(self, f: BinaryIO, vocab_size: int):
        if not 1 <= vocab_size < 2**32:
            raise ValueError(f"vocab_size must be in [1, 2**32), got {vocab_size}")
        self.f, self.vocab_size, self.n_tokens = f, vocab_size, 0
        self.dtype = token_dtype(vocab_size)
        f.write(bytes(HEADER_SIZE))  # placeholder until the count is known

    def write(self, tokens: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        if arr.size == 0:
            return
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"tokens must be a 1-D integer array, got {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside [0, {self.vocab_size})")
        self.f.write(arr.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += arr.size

    def finish(self) -> TokenFileHeader:
        h = TokenFileHeader(
            VERSION, self.dtype.itemsize, self.n_tokens, self.vocab_size
        )
        self.f.seek(0)
        self.f.write(HEADER.pack(MAGIC, *astuple(h), 0))
        self.f.seek(0, os.SEEK_END)
        return h


def write_tokens(path: str | Path, tokens, vocab_size: int) -> TokenFileHeader:
    """Write a token file atomically; every id must be in [0, vocab_size)."""
    with atomic_file(path) as f:
        writer = TokenWriter(f, vocab_size)
        writer.write(tokens)
        return writer.finish()


def read_header(path: str | Path) -> TokenFileHeader:
    """Parse and check the header (magic, version, itemsize), not the body."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: token file not found")
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise DataError(f"{path}: {len(raw)} bytes, too short for a token file")
    magic, version, itemsize, n_tokens, vocab_size, _ = HEADER.unpack(raw)
    if magic != MAGIC:
        raise DataError(f"{path}: not a token file (magic {magic!r} != {MAGIC!r})")
    if version != VERSION:
        raise DataError(f"{path}: unsupported version {version} (expected {VERSION})")
    if itemsize not in DTYPES:
        raise DataError(f"{path}: unsupported itemsize {itemsize} (expected 2 or 4)")
    return TokenFileHeader(version, itemsize, n_tokens, vocab_size)


def _check_size(path: Path, h: TokenFileHeader) -> None:
    expected, actual = HEADER_SIZE + h.n_tokens * h.itemsize, path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: the header declares {h.n_tokens} tokens "
            f"({expected} bytes) but the file has {actual} bytes"
        )


def open_tokens(path: str | Path) -> np.ndarray:
    """The token array of a file, memory-mapped read-only (size checked)."""
    path = Path(path)
    h = read_header(path)
    _check_size(path, h)
    if h.n_tokens == 0:  # np.memmap cannot map zero bytes
        return np.empty(0, dtype=h.dtype)
    return np.memmap(path, h.dtype, "r", HEADER_SIZE, (h.n_tokens,))


def validate_token_file(
    path: str | Path, vocab_size: int, context_length: int
) -> TokenFileHeader:
    """Check a token file fully before training; raise DataError naming it."""
    path = Path(path)
    h = read_header(path)
    _check_size(path, h)
    if h.n_tokens == 0:
        raise DataError(f"{path}: empty token file (0 tokens)")
    if h.n_tokens < context_length + 1:
        raise DataError(
            f"{path}: {h.n_tokens} tokens, fewer than context_length + 1 = "
            f"{context_length + 1} needed for one window"
        )
    if h.vocab_size > vocab_size:
        raise DataError(
            f"{path}: written for vocab_size {h.vocab_size}, more than the "
            f"model's {vocab_size} (a different tokenizer?)"
        )
    tokens = open_tokens(path)
    for start in range(0, h.n_tokens, SCAN_CHUNK):
        chunk = tokens[start : start + SCAN_CHUNK]
        top = int(chunk.max())
        if top >= vocab_size:
            pos = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(
                f"{path}: token id {top} >= vocab_size {vocab_size} "
                f"(first out-of-range id at position {pos})"
            )
    return h


def check_sidecar(
    path: str | Path, header: TokenFileHeader, tokenizer_sha256: str | None = None
) -> dict | None:
    """Check the meta.json beside a token file, if any, against its header and the
    model's tokenizer; return that file's entry plus the dataset's
    `chat_template` flag (None without a sidecar)."""
    path = Path(path)
    side = path.parent / DATASET_META
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{side}: damaged ({e}); re-run prepare") from None
    entries = meta.get("splits", {}) if isinstance(meta, dict) else {}
    entry = next(
        (
            e
            for e in entries.values()
            if isinstance(e, dict) and e.get("file") == path.name
        ),
        None,
    )
    if entry is None:
        return None  # a sidecar that does not describe this file
    if entry.get("n_tokens") != header.n_tokens:
        raise DataError(
            f"{path}: header holds {header.n_tokens} tokens but {side} says "
            f"{entry.get('n_tokens')} (files from different runs?)"
        )
    want = (meta.get("tokenizer") or {}).get("sha256")
    if tokenizer_sha256 is not None and want is not None and want != tokenizer_sha256:
        raise DataError(
            f"{path}: made with tokenizer sha256 {want[:12]}..., but the model uses "
            f"{tokenizer_sha256[:12]}... (re-run prepare with the model's tokenizer)"
        )
    return {**entry, "chat_template": bool(meta.get("chat_template"))}


class TokenLoader:
    """Random training windows and fixed validation windows of a token file.

    A window is context_length + 1 tokens: inputs w[:-1], targets w[1:].
    tokenizer_sha256: when given, a meta.json sidecar naming another tokenizer is
    refused.
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
        self.header = validate_token_file(self.path, vocab_size, context_length)
        self.meta = check_sidecar(self.path, self.header, tokenizer_sha256)

    @property
    def n_tokens(self) -> int:
        return self.header.n_tokens

    def _tokens(self) -> np.ndarray:
        # A fresh map per batch: one long-lived np.memmap keeps every touched page
        # resident and RSS grows over a run (the nanoGPT lesson). Mapping is cheap.
        return np.memmap(
            self.path, self.header.dtype, "r", HEADER_SIZE, (self.n_tokens,)
        )

    def batch(
        self, seed: int, step: int, batch_size: int, rows: slice = slice(None)
    ) -> np.ndarray:
        """(batch_size, context_length + 1) int32, a pure function of (seed, step);
        only `rows` of it are read and returned (a data-parallel rank's share)."""
        if min(seed, step) < 0 or batch_size < 1:
            raise ValueError(f"bad seed {seed}, step {step} or batch_size {batch_size}")
        L = self.context_length
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.n_tokens - L, size=batch_size)[rows]  # start+L<n
        return np.asarray(self._tokens()[starts[:, None] + np.arange(L + 1)], np.int32)

    def num_val_windows(self, max_tokens: int | None = None) -> int:
        """Windows needed to cover max_tokens targets (None: the whole file)."""
        available = (self.n_tokens - 1) // self.context_length
        if max_tokens is None:
            return available
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        return min(available, -(-max_tokens // self.context_length))

    def val_batches(
        self, batch_size: int, max_tokens: int | None = None
    ) -> Iterator[np.ndarray]:
        """Windows i = tokens[i*L : i*L+L+1] from the file start, in order, until
        max_tokens targets are covered; the last batch may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        L, n = self.context_length, self.num_val_windows(max_tokens)
        for first in range(0, n, batch_size):
            rows = np.arange(first, min(first + batch_size, n))
            idx = rows[:, None] * L + np.arange(L + 1)
            yield np.asarray(self._tokens()[idx], np.int32)
