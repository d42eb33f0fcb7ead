"""Start-up watchdog for a distributed rank: `python src/watchdog.py PID SECONDS MSG`.

`mx.distributed.init` (ring backend) holds the GIL while rank 0 waits in accept()
for its peers, so no Python thread in the rank can time it out. This separate
process does: it waits until the rank closes its stdin (the ring formed, or the
rank ended), or for SECONDS; on time-out it prints MSG to stderr and kills PID.

It is run by path, not as `-m src.watchdog`, so that it imports neither the
package (which preloads a BLAS) nor MLX: it must start in milliseconds.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time


def watch(pid: int, seconds: float, message: str) -> int:
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            print(message, file=sys.stderr, flush=True)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return 1
        ready, _, _ = select.select([sys.stdin], [], [], min(left, 1.0))
        if ready and not os.read(sys.stdin.fileno(), 1):  # EOF: stand down
            return 0


if __name__ == "__main__":
    raise SystemExit(watch(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]))
