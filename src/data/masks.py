"""Assistant masks (`prepare --chat`): beside each token file X.bin a mask file
X.mask.bin, named in meta.json (`mask_file` of the split), holds one uint8 per
token, 1 where the token is part of an assistant's reply (the chat loss counts
those targets), after a 24-byte header:

    offset  size  field
         0     8  magic       b"SLMMASK\0"
         8     4  version     1
        12     4  reserved    0
        16     8  n_tokens    the token file's count

`src.data.loader.TokenLoader` opens it with the token file and checks it fully
(magic, version, size, the count against the token file's, every value 0 or 1); a
mask that meta.json names but that is missing or damaged is a DataError naming
it. Mask windows are cut at the same offsets as the token windows.
"""

from __future__ import annotations

import os
import stat
import struct
import weakref
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError
from ..files import atomic_file

SCAN_CHUNK = 4 * 1024 * 1024  # bytes per read when checking the values
MASK_MAGIC = b"SLMMASK\x00"
MASK_VERSION = 1
MASK_HEADER = struct.Struct("<8sIIQ")  # magic, version, 0, n_tokens: 24 bytes


def mask_name(token_file: str) -> str:
    """The mask file of a token file: train.bin -> train.mask.bin."""
    stem = token_file[:-4] if token_file.endswith(".bin") else token_file
    return f"{stem}.mask.bin"


def is_mask_file(path: str | Path) -> bool:
    return Path(path).name.endswith(".mask.bin")


class MaskWriter:
    """Append assistant-mask chunks (0/1 per token) to a seekable binary file;
    `finish` writes the header with the count."""

    def __init__(self, f: BinaryIO):
        self.f, self.n_tokens, self.counted = f, 0, 0
        f.write(bytes(MASK_HEADER.size))  # placeholder until the count

    def write(self, mask: np.ndarray) -> None:
        arr = np.asarray(mask)
        if arr.ndim != 1 or (arr.size and int(arr.max()) > 1):
            raise ValueError("a mask is a 1-D array of 0s and 1s")
        self.f.write(arr.astype(np.uint8, copy=False).tobytes())
        self.n_tokens += arr.size
        self.counted += int(np.count_nonzero(arr))

    def finish(self) -> int:
        self.f.seek(0)
        self.f.write(MASK_HEADER.pack(MASK_MAGIC, MASK_VERSION, 0, self.n_tokens))
        self.f.seek(0, os.SEEK_END)
        return self.n_tokens


def write_mask(path: str | Path, mask) -> int:
    """Write a mask file atomically (tests, tools); returns its token count."""
    with atomic_file(path) as f:
        writer = MaskWriter(f)
        writer.write(np.asarray(mask))
        return writer.finish()


class MaskFile:
    """The assistant mask of a token file of `n_tokens` tokens (`named_in` its
    dataset's meta.json), opened once and checked fully (see the module docstring); `take` cuts windows of it from a
    fresh memory map, as `TokenLoader` does for tokens."""

    def __init__(
        self, path: str | Path, n_tokens: int, token_file: Path, named_in: Path
    ):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            raise DataError(
                f"{self.path}: assistant mask not found ({named_in}"
                f" names it for {token_file.name}); re-run `python -m src.data prepare "
                "--chat`"
            ) from None
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        self._file = open(fd, "rb", buffering=0, closefd=False)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DataError(f"{self.path}: not a file (an assistant mask file)")
            self._identity = self._stat()
            self.counted = self._check(n_tokens, token_file)
        except BaseException:
            self.close()
            raise
        self.n_tokens = n_tokens

    def close(self) -> None:
        self._closer()

    def _stat(self) -> tuple[int, int]:
        st = os.fstat(self._fd)
        return st.st_size, st.st_mtime_ns

    def _check(self, n_tokens: int, token_file: Path) -> int:
        """Header, size and values; the number of 1s."""
        raw = os.pread(self._fd, MASK_HEADER.size, 0)
        damaged = f"{self.path}: damaged assistant mask"
        fix = "re-run `python -m src.data prepare --chat`"
        if len(raw) < MASK_HEADER.size:
            raise DataError(f"{damaged} ({len(raw)} bytes, no header); {fix}")
        magic, version, _, n = MASK_HEADER.unpack(raw)
        if magic != MASK_MAGIC:
            raise DataError(f"{damaged} (magic {magic!r} != {MASK_MAGIC!r}); {fix}")
        if version != MASK_VERSION:
            raise DataError(
                f"{self.path}: unsupported mask version {version} (expected "
                f"{MASK_VERSION}); {fix}"
            )
        if n != n_tokens:
            raise DataError(
                f"{self.path}: masks {n} tokens but {token_file} holds {n_tokens} "
                f"(files from different runs?); {fix}"
            )
        size = self._stat()[0]
        if size != MASK_HEADER.size + n:
            raise DataError(
                f"{damaged} (its header declares {n} tokens, "
                f"{MASK_HEADER.size + n} bytes, but the file has {size}); {fix}"
            )
        counted = 0
        for start in range(0, n, SCAN_CHUNK):
            want = min(SCAN_CHUNK, n - start)
            chunk = np.frombuffer(
                os.pread(self._fd, want, MASK_HEADER.size + start), np.uint8
            )
            if len(chunk) != want or (chunk.size and int(chunk.max()) > 1):
                raise DataError(f"{damaged} (a value other than 0 or 1); {fix}")
            counted += int(np.count_nonzero(chunk))
        if self._stat() != self._identity:
            raise DataError(f"{self.path}: changed while it was checked")
        return counted

    def take(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) bool: mask[s : s + length] for each start."""
        if self._stat() != self._identity:
            raise DataError(
                f"{self.path}: changed in place while in use; never rewrite a mask "
                "file in place (re-run prepare, which writes new files)"
            )
        mask = np.memmap(self._file, np.uint8, "r", MASK_HEADER.size, (self.n_tokens,))
        out = np.asarray(mask[starts[:, None] + np.arange(length)], bool)
        del mask  # unmapped here, as the token windows
        return out
