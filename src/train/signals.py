"""Stopping a run cleanly: SIGINT and SIGTERM ask the loop to save at the next
step boundary and exit 0; a second Ctrl-C quits at once (checkpoints are atomic,
so the last committed one stays valid)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


class StopSignal:
    """SIGINT/SIGTERM set `requested` (the loop saves at the next step boundary and
    exits 0); a second SIGINT exits at once with 130."""

    def __init__(self):
        self.requested = False
        self.notice = "saving at the end of this step"  # what a signal will do now
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            os._exit(130)  # checkpoints are atomic: the last committed one is intact
        self.requested = True
        with contextlib.suppress(OSError):  # a closed console: raised at any line
            print(
                f"\nreceived {signal.Signals(signum).name}: {self.notice} "
                "(Ctrl-C again to quit now)",
                file=sys.stderr,
            )

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
