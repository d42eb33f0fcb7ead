"""Durable file writes: what reaches the disk is whole or absent.

A file is written under a temporary name beside its target, flushed and fsynced,
then renamed over the target (`atomic_file`); a directory is fsynced after a
rename in it, so the rename itself survives a crash (`fsync_path`). Outputs are
proved writable before any long work starts (`check_writable`). No MLX here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from .errors import CheckpointError


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (the caller renames it into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator:
    """Yield a temp file next to `path`; on a clean exit fsync it and rename it over
    `path`, on an exception delete it: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    try:
        with open(tmp, mode.replace("w", "x"), **text) as f:  # "x": never clobber
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable(directory: str | Path) -> Path:
    """Create `directory` if needed and prove it writable with a synced probe file;
    CheckpointError naming it otherwise. For start-up: a bad output folder fails
    in the first second, not at the first save hours later."""
    d = Path(directory)
    probe = d / f".write-probe-{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        write_bytes(probe, b"probe")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"output directory {d} is not writable: {e}") from e
    return d
