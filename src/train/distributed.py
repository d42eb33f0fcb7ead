"""Data-parallel training on MLX's own distributed engine (`mx.distributed`, ring).

A rank is one process holding the whole model. Step n's global batch is drawn as
on one process (batch_size x grad_accum_steps windows from rng(seed, n)); with N
ranks, rank r reads and computes its own grad_accum_steps / N micro-batches of it,
and the compiled step averages loss and gradients over the ranks before clipping
(src/train/step.py). The effective batch, the learning-rate schedule and the data
position of every step are therefore those of one process, whatever N: N ranks
train like one process up to fp32 summation order. Rank 0 loads a checkpoint and
broadcasts weights, optimizer state and step; it alone writes logs, samples and
checkpoints, while the others wait at a barrier. Validation is split by batches
and the loss sums are added over ranks.

Start-up guards against the traps of MLX's ring backend:
- `mx.distributed.init` runs under a watchdog process (src/train/watchdog.py): rank 0
  would wait forever for a rank that never starts, holding the GIL, so no thread
  of its own can give up.
- A job check: the ranks all-gather digests of SLM_JOB_ID and of the resolved
  config, so two jobs on the same ports (the ring's sockets use SO_REUSEPORT: the
  second job binds silently and may connect to the first) or ranks started with
  different configs are refused.
- A thread watches the parent: when the launcher dies, the rank stops as on
  SIGTERM (the ranks agree on the stop step, rank 0 saves), so no orphan is left.
A rank that dies mid-run makes the next collective on the others raise
RuntimeError("[ring] ...") within a second; the trainer then exits with
PEER_LOST_EXIT (3), so that a launcher can tell the cause from its echoes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..config import Config
from ..errors import ConfigError, DistributedError

JOB_ENV = "SLM_JOB_ID"  # the same on every rank of a job; `--nproc` sets a fresh one
PEER_LOST_EXIT = 3  # exit status of a rank that stopped because another one died
WATCHDOG = Path(__file__).with_name("watchdog.py")
PARENT_POLL_S = 0.5


def rank_tag() -> str:
    """' (rank r)' for the messages of a launched rank other than 0, else ''."""
    rank = os.environ.get("MLX_RANK", "0")
    return f" (rank {rank})" if os.environ.get("MLX_HOSTFILE") and rank != "0" else ""


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is the ring backend reporting a lost or unreachable peer."""
    return isinstance(exc, RuntimeError) and str(exc).startswith("[ring]")


def report_failure(exc: RuntimeError) -> int:
    """Print a distributed failure without a traceback; returns the exit code (2 for
    a DistributedError, PEER_LOST_EXIT for a lost peer). Other errors are re-raised."""
    if isinstance(exc, DistributedError):
        msg, code = str(exc), 2
    elif is_peer_failure(exc):
        msg = f"lost the connection to another rank (it exited or died): {exc}"
        code = PEER_LOST_EXIT
    else:
        raise exc
    print(f"error{rank_tag()}: {msg}", file=sys.stderr)
    return code


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; `Dist()` is a single-process run."""

    rank: int = 0
    world: int = 1
    group: mx.distributed.Group | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def local_accum(self, grad_accum_steps: int) -> int:
        """Micro-batches per rank and step: the config's accumulation split over
        ranks, so that the effective batch does not depend on the rank count."""
        if grad_accum_steps % self.world:
            raise ConfigError(
                f"training.grad_accum_steps={grad_accum_steps} is not divisible by "
                f"the number of ranks ({self.world}): the effective batch "
                "(batch_size x grad_accum_steps) is split over the ranks; use a "
                f"multiple of {self.world} or another number of ranks"
            )
        return grad_accum_steps // self.world

    def rows(self, per_rank: int) -> slice:
        """This rank's rows of a global batch of world x per_rank rows."""
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def sum(self, x: mx.array) -> mx.array:
        """Lazy sum of `x` over ranks."""
        return mx.distributed.all_sum(x, group=self.group) if self.world > 1 else x

    def any(self, flag: bool) -> mx.array:
        """Lazy: whether `flag` is set on any rank (evaluate it with the step)."""
        return self.sum(mx.array(int(flag))) > 0

    def barrier(self) -> None:
        mx.eval(self.sum(mx.array(0)))

    def broadcast_state(self, model, optimizer, step: int) -> int:
        """Give every rank rank 0's weights, optimizer state and step (returned),
        written in place (a compiled step holds the state containers)."""
        if self.world == 1:
            return step
        model.update(self._from_main(model.parameters()))
        optimizer.load_state_dict(self._from_main(optimizer.state_dict()))
        step_array = self._from_main(mx.array(step))
        mx.eval(model.parameters(), optimizer.state, step_array)
        return step_array.item()

    def agree(self, value: int) -> int:
        """Rank 0's `value`, on every rank."""
        return value if self.world == 1 else self._from_main(mx.array(value)).item()

    def _from_main(self, tree):
        # The ring backend has no broadcast: an all_sum where only rank 0 adds
        # non-zeros (x + 0 is exact; -0.0 becomes +0.0 on every rank alike).
        return tree_map(lambda x: self.sum(x if self.main else mx.zeros_like(x)), tree)

    def check_in_sync(self, step: int, params) -> str:
        """Raise DistributedError unless every rank is at `step` with bitwise equal
        `params`; returns a line for the log."""
        ours = np.array([step, checksum(params)], np.uint64)
        gathered = mx.distributed.all_gather(mx.array(ours), group=self.group)
        for r, theirs in enumerate(np.array(gathered).reshape(self.world, 2)):
            if not np.array_equal(theirs, ours):
                raise DistributedError(
                    f"ranks out of sync: rank {r} is at step {theirs[0]} with "
                    f"parameter checksum {theirs[1]:#x}, rank {self.rank} at step "
                    f"{step} with {ours[1]:#x}"
                )
        return (
            f"ranks in sync at step {step}: parameter checksum {ours[1]:#018x} "
            f"on all {self.world} ranks"
        )


ONE_PROCESS = Dist()


def checksum(tree) -> int:
    """Sum (mod 2^64) of the arrays' bit patterns as 32-bit words: equal on equal
    trees, changed by any single flipped bit."""
    total = mx.array(0, mx.uint64)
    for _, x in tree_flatten(tree):
        words = mx.view(x.reshape(-1), mx.uint32 if x.nbytes % 4 == 0 else mx.uint8)
        total = total + words.astype(mx.uint64).sum()
    return int(total.item())


def init(cfg: Config, start_timeout: float) -> Dist:
    """Join the job this process was launched into (MLX_RANK and MLX_HOSTFILE set,
    by `--nproc` or `mlx.launch`), or return Dist() for a single process.

    Raises DistributedError when the ring cannot form or mixes jobs or configs;
    when it has not formed after `start_timeout` seconds the watchdog prints why
    and kills this process."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    ring = _ring_addresses(hostfile) if hostfile else ""
    if not ring:  # not launched, or `mlx.launch -n 1` (an empty hostfile)
        return Dist()
    rank = os.environ.get("MLX_RANK", "?")
    timeout_msg = (
        f"error (rank {rank}): the ranks did not all connect within "
        f"{start_timeout:g} s (ring {ring}): a rank never started, crashed, or "
        "cannot reach its neighbour's address; start every rank, or raise "
        "--start-timeout"
    )
    with _watchdog(start_timeout, timeout_msg):
        try:
            group = mx.distributed.init(strict=True, backend="ring")
        except RuntimeError as exc:
            raise DistributedError(f"could not join the ring {ring}: {exc}") from None
        dist = Dist(group.rank(), group.size(), group)
        if dist.world > 1:
            _check_same_job(dist, cfg)
    if dist.world > 1:
        _watch_parent(dist.rank)
    return dist


def _ring_addresses(hostfile: str) -> str:
    """'IP:PORT, IP:PORT, ...' of a ring hostfile; '' for an empty file."""
    try:
        text = Path(hostfile).read_text()
        hosts = json.loads(text) if text.strip() else []
        return ", ".join(addr for node in hosts for addr in node)
    except (OSError, ValueError, TypeError) as exc:
        raise DistributedError(
            f"MLX_HOSTFILE={hostfile}: not a ring hostfile "
            f'([["IP:PORT"], ["IP:PORT"], ...]): {exc}'
        ) from None


@contextlib.contextmanager
def _watchdog(seconds: float, message: str):
    """Kill this process with `message` unless the block ends within `seconds`."""
    cmd = [sys.executable, "-I", str(WATCHDOG), str(os.getpid()), str(seconds)]
    proc = subprocess.Popen([*cmd, message], stdin=subprocess.PIPE)
    try:
        yield
    finally:
        proc.stdin.close()  # EOF: the watchdog stands down
        proc.wait()


def _digest(text: str) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.uint8)


def _check_same_job(dist: Dist, cfg: Config) -> None:
    config = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
    ours = np.concatenate([_digest(os.environ.get(JOB_ENV, "")), _digest(config)])
    gathered = mx.distributed.all_gather(mx.array(ours), group=dist.group)
    for r, theirs in enumerate(np.array(gathered).reshape(dist.world, -1)):
        if not np.array_equal(theirs[:8], ours[:8]):
            raise DistributedError(
                f"rank {r} belongs to another job ({JOB_ENV} differs from rank "
                f"{dist.rank}'s): two jobs listen on the same ports and their ranks "
                "connected to each other. Give each job its own ports (--nproc "
                "picks free ones; mlx.launch: --starting-port)"
            )
        if not np.array_equal(theirs[8:], ours[8:]):
            raise DistributedError(
                f"rank {r} was started with another config than rank {dist.rank}: "
                "every rank of a job needs the same --config and --set values"
            )


def _watch_parent(rank: int) -> None:
    """Stop this rank (as on SIGTERM) when its launcher exits, e.g. killed -9."""
    parent = os.getppid()
    if parent == 1:  # started detached: there is no launcher to outlive
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        try:
            print(
                f"rank {rank}: the launcher (pid {parent}) is gone: stopping",
                file=sys.stderr,
                flush=True,
            )
        except OSError:  # the console was the launcher's pipe: carry on without it
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.dup2(devnull, sys.stderr.fileno())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
