"""Token files: their format, writing, reading and checking. No MLX or torch here.

File format (little-endian): a header, then the token ids.

    offset  size  field
         0     8  magic       b"SLMTOKS\\0"
         8     4  version     2 (1: no tokenizer field, the header ends at 32)
        12     4  itemsize    2 (uint16, when vocab_size <= 65536) or 4 (uint32)
        16     8  n_tokens
        24     4  vocab_size  every id is in [0, vocab_size)
        28     4  reserved    0
        32    32  tokenizer   sha256 digest of the tokenizer.model the ids are of

A version 2 header is 64 bytes and names the tokenizer, so a token file carries
its tokenizer check with it (a meta.json can be lost or copied from elsewhere);
a file written without a tokenizer hash (`write_tokens` without one: eval's
temporary files, tests) is version 1, whose 32-byte header names none. Both are
read. The file size is exactly header + n_tokens * itemsize. Files are written
atomically (temp file, fsync, rename), so a reader never sees half a file.

The training loader over these files is `src.data.loader.TokenLoader`.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError
from ..files import atomic_file

MAGIC = b"SLMTOKS\x00"
VERSION = 2  # what `prepare` writes; version 1 files are still read
HEADER = struct.Struct("<8sIIQII")  # magic, version, itemsize, n_tokens, vocab, 0
HEADER_SIZE = HEADER.size  # 32: the version 1 header, the start of every header
TOKENIZER_FIELD = struct.Struct("<32s")  # version 2: the tokenizer's sha256 digest
HEADER_BYTES = {1: HEADER_SIZE, 2: HEADER_SIZE + TOKENIZER_FIELD.size}  # 32, 64
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
SCAN_CHUNK = 4 * 1024 * 1024  # tokens per read when scanning for bad ids
DATASET_META = "meta.json"


@dataclass(frozen=True)
class TokenFileHeader:
    version: int
    itemsize: int
    n_tokens: int
    vocab_size: int
    tokenizer_sha256: str | None = None  # hex; None in version 1 files

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.itemsize]

    @property
    def offset(self) -> int:
        """Where the ids start: the header's size."""
        return HEADER_BYTES[self.version]

    @property
    def file_size(self) -> int:
        return self.offset + self.n_tokens * self.itemsize

    def pack(self) -> bytes:
        head = HEADER.pack(
            MAGIC, self.version, self.itemsize, self.n_tokens, self.vocab_size, 0
        )
        if self.version == 1:
            return head
        return head + TOKENIZER_FIELD.pack(bytes.fromhex(self.tokenizer_sha256))


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest id type for a vocabulary: uint16 up to 65,536 tokens, else
    uint32 (token files, and the arrays that fill them, use it)."""
    return DTYPES[2 if vocab_size <= 65536 else 4]


def _check_sha256(sha: str) -> None:
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ValueError(f"tokenizer_sha256 must be 64 lower-case hex digits: {sha!r}")


class TokenWriter:
    """Append token chunks to a seekable binary file; `finish` writes the header
    (version 2 naming the tokenizer when `tokenizer_sha256` is given, else 1)."""

    def __init__(
        self, f: BinaryIO, vocab_size: int, tokenizer_sha256: str | None = None
    ):
        if not 1 <= vocab_size < 2**32:
            raise ValueError(f"vocab_size must be in [1, 2**32), got {vocab_size}")
        self.f, self.vocab_size, self.n_tokens = f, vocab_size, 0
        if tokenizer_sha256 is not None:
            _check_sha256(tokenizer_sha256)
        self.tokenizer_sha256 = tokenizer_sha256
        self.version = 1 if tokenizer_sha256 is None else 2
        self.dtype = token_dtype(vocab_size)
        f.write(bytes(HEADER_BYTES[self.version]))  # placeholder until the count

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
            self.version,
            self.dtype.itemsize,
            self.n_tokens,
            self.vocab_size,
            self.tokenizer_sha256,
        )
        self.f.seek(0)
        self.f.write(h.pack())
        self.f.seek(0, os.SEEK_END)
        return h


def write_tokens(
    path: str | Path, tokens, vocab_size: int, tokenizer_sha256: str | None = None
) -> TokenFileHeader:
    """Write a token file atomically; every id must be in [0, vocab_size)."""
    with atomic_file(path) as f:
        writer = TokenWriter(f, vocab_size, tokenizer_sha256)
        writer.write(tokens)
        return writer.finish()


def _open(path: Path) -> int:
    """A read-only descriptor of the token file at `path`; DataError naming it
    when there is none."""
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(
            f"{path}: token file not found; make it with `python -m src.data "
            f"prepare --input TEXT --tokenizer TOKENIZER --output {path.parent}`"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"{path}: not a file (a token file is a .bin file)")
    return fd


def _parse_header(raw: bytes, path: Path) -> TokenFileHeader:
    if len(raw) < HEADER_SIZE:
        raise DataError(f"{path}: {len(raw)} bytes, too short for a token file")
    magic, version, itemsize, n_tokens, vocab_size, _ = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataError(f"{path}: not a token file (magic {magic!r} != {MAGIC!r})")
    if version not in HEADER_BYTES:
        raise DataError(
            f"{path}: unsupported version {version} (expected 1 or {VERSION})"
        )
    if itemsize not in DTYPES:
        raise DataError(f"{path}: unsupported itemsize {itemsize} (expected 2 or 4)")
    sha = None
    if version == 2:
        if len(raw) < HEADER_BYTES[2]:
            raise DataError(f"{path}: {len(raw)} bytes, too short for its header")
        (digest,) = TOKENIZER_FIELD.unpack_from(raw, HEADER_SIZE)
        sha = digest.hex() if any(digest) else None
    return TokenFileHeader(version, itemsize, n_tokens, vocab_size, sha)


def _read_header(fd: int, path: Path) -> TokenFileHeader:
    """Parse and check the header of an open file, and its size against it."""
    h = _parse_header(os.pread(fd, HEADER_BYTES[VERSION], 0), path)
    actual = os.fstat(fd).st_size
    if actual != h.file_size:
        what = "truncated" if actual < h.file_size else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: the header declares {h.n_tokens} tokens "
            f"({h.file_size} bytes) but the file has {actual} bytes"
        )
    return h


def read_header(path: str | Path) -> TokenFileHeader:
    """Parse and check the header (magic, version, itemsize, the file's size
    against it), not the body."""
    path = Path(path)
    fd = _open(path)
    try:
        return _read_header(fd, path)
    finally:
        os.close(fd)


def open_tokens(path: str | Path) -> np.ndarray:
    """The token array of a file, memory-mapped read-only (header and size
    checked): for tools that read a file once, not for a training run."""
    path = Path(path)
    with open(_open(path), "rb") as f:  # header and map of one and the same file
        h = _read_header(f.fileno(), path)
        if h.n_tokens == 0:  # np.memmap cannot map zero bytes
            return np.empty(0, dtype=h.dtype)
        return np.memmap(f, h.dtype, "r", h.offset, (h.n_tokens,))


def _pread_tokens(
    fd: int, path: Path, h: TokenFileHeader, start: int, count: int
) -> np.ndarray:
    """tokens[start : start + count] of an open file; DataError if it is shorter
    than its header says (truncated in place since it was checked)."""
    want = count * h.itemsize
    raw = os.pread(fd, want, h.offset + start * h.itemsize)
    if len(raw) != want:
        raise DataError(
            f"{path}: truncated while in use (no tokens {start}..{start + count} "
            f"of the {h.n_tokens} its header declares); never rewrite a token file "
            "in place: write a new one and rename it over the old (as prepare does)"
        )
    return np.frombuffer(raw, h.dtype)


def _check_ids(read, path: Path, h: TokenFileHeader, vocab_size: int) -> None:
    """Every id of the file (read by `read(start, count)`) < vocab_size."""
    for start in range(0, h.n_tokens, SCAN_CHUNK):
        chunk = read(start, min(SCAN_CHUNK, h.n_tokens - start))
        top = int(chunk.max())
        if top >= vocab_size:
            pos = start + int(np.argmax(chunk >= vocab_size))
            raise DataError(
                f"{path}: token id {top} >= vocab_size {vocab_size} "
                f"(first out-of-range id at position {pos})"
            )


def _validate(
    fd: int,
    path: Path,
    vocab_size: int,
    context_length: int,
    tokenizer_sha256: str | None = None,
) -> TokenFileHeader:
    h = _read_header(fd, path)
    if h.n_tokens == 0:
        raise DataError(f"{path}: empty token file (0 tokens)")
    if h.n_tokens < context_length + 1:
        raise DataError(
            f"{path}: {h.n_tokens} tokens, fewer than context_length + 1 = "
            f"{context_length + 1} needed for one window"
        )
    if tokenizer_sha256 is not None and h.tokenizer_sha256 not in (
        None,
        tokenizer_sha256,
    ):
        raise DataError(
            f"{path}: its header says it was made with tokenizer sha256 "
            f"{h.tokenizer_sha256}, but the model's tokenizer is {tokenizer_sha256} "
            "(re-run `python -m src.data prepare` with the model's tokenizer, or "
            "set data.tokenizer_path to the tokenizer the file was made with)"
        )
    if h.vocab_size > vocab_size:
        raise DataError(
            f"{path}: written for vocab_size {h.vocab_size}, more than the "
            f"model's {vocab_size} (a different tokenizer?)"
        )
    _check_ids(
        lambda start, n: _pread_tokens(fd, path, h, start, n), path, h, vocab_size
    )
    return h


def validate_token_file(
    path: str | Path,
    vocab_size: int,
    context_length: int,
    tokenizer_sha256: str | None = None,
) -> TokenFileHeader:
    """Check a token file fully before training (header, size, every id, and the
    tokenizer a version 2 header names against `tokenizer_sha256` when given);
    raise DataError naming it."""
    path = Path(path)
    fd = _open(path)
    try:
        return _validate(fd, path, vocab_size, context_length, tokenizer_sha256)
    finally:
        os.close(fd)


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
    if header.tokenizer_sha256 is not None and want not in (
        None,
        header.tokenizer_sha256,
    ):
        raise DataError(
            f"{path}: its header names tokenizer sha256 "
            f"{header.tokenizer_sha256[:12]}... but {side} says {want[:12]}... "
            "(files from different runs?); re-run prepare"
        )
    return {**entry, "chat_template": bool(meta.get("chat_template"))}
