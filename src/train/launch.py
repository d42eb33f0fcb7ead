"""`python -m src.train --config X --nproc N`: N data-parallel ranks on this machine.

The launcher picks N free TCP ports on 127.0.0.1, writes the ring backend's
hostfile (`[["127.0.0.1:P0"], ["127.0.0.1:P1"], ...]`: rank r listens on entry r)
and starts N copies of the trainer with MLX_RANK, MLX_HOSTFILE and a fresh
SLM_JOB_ID. Each rank runs in its own session, so a terminal's Ctrl-C reaches it
once, forwarded by the launcher (a second Ctrl-C, forwarded too, quits at once).

It forwards SIGINT and SIGTERM to every rank. When a rank exits non-zero, the
others get GRACE_S seconds to notice by themselves (a collective with a dead peer
fails within a second) and are then killed, so a job never hangs on a dead rank.
The exit status is that of the first rank that failed on its own account (not
with PEER_LOST_EXIT, not killed here; 128 + signal for a rank killed by a signal),
else of the first that failed, else 0. `mlx.launch`, by contrast, exits 0
whatever its ranks do.

Ranks share the machine's cores: each gets OPENBLAS_NUM_THREADS = cores / N
unless the variable is already set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .. import cli
from ..config import Config
from ..errors import ConfigError
from .distributed import JOB_ENV, PEER_LOST_EXIT, Dist

GRACE_S = 3.0
MAX_RANKS = 256  # ranks on one machine; more is a typo, not a job
POLL_S = 0.05


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    """The trainer's data-parallel options."""
    p.add_argument(
        "--nproc",
        type=cli.int_in(1, MAX_RANKS),
        default=1,
        metavar="N",
        help="data-parallel: run N ranks on this machine (ring backend on "
        "127.0.0.1); training.grad_accum_steps is split over them",
    )
    p.add_argument(
        "--start-timeout",
        type=cli.positive_number,
        default=120.0,
        metavar="S",
        help="data-parallel: seconds to wait for every rank to connect (default 120)",
    )


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct TCP ports on `host` that the OS found free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` minus `--nproc N` / `--nproc=N` (the ranks must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(argv: list[str], nproc: int, cfg: Config) -> int:
    """Run `python -m src.train argv` (minus --nproc) as `nproc` ranks of the run
    `cfg`; returns the job's exit status. Raises ConfigError on a bad setup."""
    if os.environ.get("MLX_HOSTFILE"):
        raise ConfigError("--nproc launches ranks itself: drop it under mlx.launch")
    Dist(world=nproc).local_accum(cfg.training.grad_accum_steps)  # before spawning
    ports = free_ports(nproc)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="slm-ring-") as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
        env = {**os.environ, "MLX_HOSTFILE": str(hostfile), JOB_ENV: uuid.uuid4().hex}
        threads = max(1, (os.cpu_count() or 1) // nproc)
        env.setdefault("OPENBLAS_NUM_THREADS", str(threads))
        cmd = [sys.executable, "-m", "src.train", *without_nproc(argv)]
        with _forward_signals(procs):
            for rank in range(nproc):
                procs.append(
                    subprocess.Popen(
                        cmd, env={**env, "MLX_RANK": str(rank)}, start_new_session=True
                    )
                )
            pids = ", ".join(f"rank {r} pid {p.pid}" for r, p in enumerate(procs))
            print(
                f"launched {nproc} ranks on 127.0.0.1 ports "
                f"{', '.join(map(str, ports))} ({pids})",
                file=sys.stderr,
                flush=True,
            )
            return _wait(procs)


@contextlib.contextmanager
def _forward_signals(procs: list[subprocess.Popen]):
    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _status(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode


def _wait(procs: list[subprocess.Popen]) -> int:
    """Wait for every rank; once one fails, kill the others after GRACE_S. Returns
    the job's exit status (see the module docstring)."""
    failed: list[int] = []  # ranks, in the order their failures were seen
    killed: set[int] = set()
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        failed += [r for r, c in enumerate(codes) if c and r not in failed]
        if None not in codes:
            break
        if failed and deadline is None:
            deadline = time.monotonic() + GRACE_S
            print(
                f"rank {failed[0]} exited with status {codes[failed[0]]}: "
                "stopping the other ranks",
                file=sys.stderr,
                flush=True,
            )
        if deadline is not None and time.monotonic() > deadline:
            for r, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    killed.add(r)
        time.sleep(POLL_S)
    own = [r for r in failed if r not in killed and codes[r] != PEER_LOST_EXIT]
    return _status(codes[(own or failed)[0]]) if failed else 0
