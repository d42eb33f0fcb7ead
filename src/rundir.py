"""Start-up guards for a run directory: prove it writable, lock it, and decide
between resuming, refusing and starting over.

Both run before anything is allocated, so a bad output folder or a second trainer
on the same run fails in the first second, not at the first save hours later.
Errors are `CheckpointError`s naming the path (the trainer reports them, exit 2).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from . import checkpoint as ckpt
from .checkpoint import CheckpointError
from .config import ConfigError


def check_writable(directory) -> Path:
    """Create `directory` if needed and prove it writable with a synced probe file.

    Meant for start-up, so a bad output dir fails in the first second, not at the
    first save hours later.
    """
    d = Path(directory)
    probe = d / f".write-probe-{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"output directory {d} is not writable: {e}") from e
    return d


class RunLock:
    """Exclusive lock on `<run_dir>/.lock` so that two trainers never share a run.

    Uses flock, which the kernel drops when the holder dies: a stale lock file left
    by a dead process does not block. The holder's pid is written for the message.
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot create lock file {self.path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"run directory {self.run_dir} is in use by another trainer "
                f"(pid {holder}); lock file {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # the file stays: unlinking lock files races
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def resume_or_clear(
    ckpt_dir: Path, log_dir: Path, resume: str | None, overwrite: bool, warn
) -> Path | None:
    """The checkpoint to resume from (`--resume auto|PATH`), or None for a fresh
    start: refused if the run already has checkpoints, unless `overwrite`, which
    empties the run's checkpoint and log folders (keeping the lock)."""
    existing = ckpt.list_checkpoints(ckpt_dir)
    if resume:
        return ckpt.resolve_resume(resume, ckpt_dir, warn=warn)
    if existing and not overwrite:
        raise ConfigError(
            f"{ckpt_dir} already has checkpoints (newest {existing[-1].name}); "
            "pass --resume auto to continue it, --overwrite to start over, "
            "or pick another name with --set run_name=NAME"
        )
    if overwrite:
        for folder in (ckpt_dir, log_dir):
            for path in folder.iterdir():
                if path.name == ".lock":
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    return None
