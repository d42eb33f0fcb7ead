"""Ctrl-C and SIGTERM in the data commands. No MLX or torch here.

By default SIGTERM ends a process on the spot: no `finally` runs, so temp files
stay and worker processes are orphaned. Inside `unwinding()` SIGINT and SIGTERM
both raise `Interrupted` (a KeyboardInterrupt), which unwinds the command as
Ctrl-C does: temp files are deleted, the worker pool is shut down, and the
command ends with 128 + the signal's number. `held()` defers them over a commit
(a few renames), so a signal comes before the commit or after it, never inside.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM; `committed`: it came while the command's output was
    being committed, and was raised once that was done."""

    def __init__(self, signum: int, committed: bool = False):
        self.signum, self.committed = signum, committed
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


def _main_thread() -> bool:
    # Python runs signal handlers in the main thread and only lets it set them.
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def unwinding() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the block. Only the first does:
    later ones are ignored, so they cannot cut the clean-up short."""
    if not _main_thread():
        yield
        return
    raised = False

    def handle(signum, frame):
        nonlocal raised
        if not raised:
            raised = True
            raise Interrupted(signum)

    old = _replace(handle)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _replace(handler) -> dict:
    """Set `handler` for SIGINT and SIGTERM, except where a signal is ignored (a
    job started in the background ignores SIGINT); the handlers it replaced."""
    old = {}
    for s in SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            old[s] = signal.signal(s, handler)
    return old


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Defer SIGINT and SIGTERM over the block; if one came, raise
    `Interrupted(committed=True)` when the block has ended without an error."""
    if not _main_thread():
        yield
        return
    came: list[int] = []
    old = _replace(lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if came:
        raise Interrupted(came[0], committed=True)
