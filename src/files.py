"""Durable file writes: what reaches the disk is whole or absent.

A file is written under a temporary name beside its target, flushed and fsynced,
then renamed over the target (`atomic_file`); a directory is fsynced after a
rename in it, so the rename itself survives a crash (`fsync_path`). Outputs are
proved writable before any long work starts (`check_writable`), and a failed
write is described in user terms, a full disk as such (`write_failure`). No MLX
here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
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
def atomic_file(
    path: str | Path, mode: str = "wb", *, replace: bool = True
) -> Iterator:
    """Yield a temp file next to `path`; on a clean exit fsync it and rename it over
    `path`, on an exception delete it: readers never see half a file. With
    `replace=False` an existing `path` is never replaced, even one made while the
    file was written: the temp file is hard-linked to `path` (which fails if it
    exists: FileExistsError) instead of renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    try:
        with open(tmp, mode.replace("w", "x"), **text) as f:  # "x": never clobber
            yield f
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
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


def check_creatable(directory: str | Path) -> Path:
    """`check_writable` without creating anything: `directory` is a writable
    folder, or could be made in its nearest existing parent; CheckpointError
    naming it otherwise. For checks that must run before inputs are read."""
    d = Path(directory)
    base = d
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise CheckpointError(
            f"output directory {d} is not writable ({base} is not a folder)"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise CheckpointError(f"output directory {d} is not writable ({base})")
    return d


# Below this much free space a failed write is reported as a full disk: MLX's own
# writers report ENOSPC as "[Errno 5] Unable to write N bytes".
DISK_FULL_BELOW = 1 << 20


def write_failure(path: str | Path, exc: BaseException) -> str:
    """One line for a write to `path` that failed with `exc`: a full disk (ENOSPC,
    EDQUOT, or almost no space left where `path` lives) is said as such."""
    code = getattr(exc, "errno", None)
    free = None
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(folder).free
            break
    if code in (errno.ENOSPC, errno.EDQUOT) or (
        free is not None and free < DISK_FULL_BELOW
    ):
        return f"cannot write {path}: disk full (no space left on device)"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return f"cannot write {path}: {reason}"
