"""One trainer per run: an exclusive lock on `<run_dir>/.lock`, taken before
anything is allocated, so a second trainer on the same run fails in the first
second, naming the holder's pid (`CheckpointError`, exit 2). A run holds the lock
of every folder it writes (`locked`: its checkpoint and its log folder), so two
runs that share either one cannot both start."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointError


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


@contextlib.contextmanager
def locked(*folders) -> Iterator[None]:
    """Hold the `RunLock` of each folder (one that is named twice, once); when
    one is refused, those already taken are released before the error."""
    with contextlib.ExitStack() as stack:
        seen = set()
        for folder in folders:
            if Path(folder).resolve() not in seen:
                seen.add(Path(folder).resolve())
                stack.enter_context(RunLock(folder))
        yield
