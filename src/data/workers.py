"""The worker pool of `prepare`: the input as a stream of tasks (made by
`src.corpus.sources.Source.tasks`), each turned into one `Encoded` batch, on N
processes, in input order. No MLX or torch here.

A task is a byte range of a local .txt file (`src.corpus.text.TextRange`), cut
where no document is, which the worker reads itself, or a list of texts the
parent read (jsonl/parquet rows, hub datasets). So for .txt input the parent
neither reads nor ships text: it sends (path, start, end) and gets back a few
numpy buffers per 256 KiB of text. `BatchRunner.map` keeps at most 2N tasks in
flight, so memory stays bounded, and yields results in input order, so the output
does not depend on N; with N = 1 it runs the same code in this process.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from ..corpus.sources import Task, task_documents
from ..errors import DataError
from ..tokenizer.kinds import TokenizerLike, load_tokenizer
from .documents import Encoded, Job, encode_documents

# A .txt task: large enough that the per-task cost (~1 ms) is small, small enough
# that the last tasks of a run share out evenly among the workers.
RANGE_BYTES = 1 << 18


def run_task(tok: TokenizerLike, job: Job, task: Task) -> Encoded:
    """Read (for a text range), filter, hash and encode one task's documents."""
    return encode_documents(tok, job, task_documents(task))


_WORKER: tuple[TokenizerLike, Job] | None = None
PARENT_POLL_S = 0.5  # how often a worker checks that its parent is alive


def _init_worker(job: Job, parent: int | None) -> None:
    global _WORKER
    # Signals are the parent's to handle: Ctrl-C reaches the whole process group,
    # and SIGTERM handlers inherited through fork would raise in here.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _exit_with_parent(parent)
    _WORKER = (load_tokenizer(job.tokenizer, threads=1), job)


def _exit_with_parent(parent: int | None) -> None:
    """End this worker when its parent process is gone. A parent that shuts the
    pool down stops its workers; one killed outright (SIGKILL, or a crash) cannot,
    and its workers would wait for tasks forever. An orphan is adopted by another
    process, so its parent id changes: a thread watches for that. `parent`: the
    pid this worker must have as its parent (None: whatever it has now, for a
    forkserver's workers, whose parent is the server, which exits with ours)."""
    born_to = os.getppid()
    if parent is not None and born_to != parent:
        os._exit(1)  # the parent died before this worker started

    def watch() -> None:
        while os.getppid() == born_to:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run(task: Task) -> Encoded:
    assert _WORKER is not None, "worker not initialised"
    return run_task(*_WORKER, task)


def worker_context():
    """The multiprocessing context the workers start from."""
    # fork starts a worker in a millisecond with everything already imported;
    # forkserver and spawn start an interpreter that imports numpy and
    # sentencepiece first (~0.3 s, a tenth of a 10 MB run). Fork only on Linux
    # (macOS system libraries are not fork-safe) and only from a parent with no
    # other thread that could hold a lock the child then waits on forever.
    if sys.platform == "linux" and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context(
        "forkserver" if "forkserver" in methods else "spawn"
    )


def max_workers() -> int:
    """The most worker processes a run may start: 4 per core, at least 8."""
    return max(8, 4 * (os.cpu_count() or 1))


class BatchRunner:
    """`run_task` over a stream of tasks, in order, on `workers` processes (1: in
    this process, the reference the parallel path must match)."""

    def __init__(self, job: Job, workers: int):
        if not 1 <= workers <= max_workers():
            raise DataError(
                f"--workers must be in [1, {max_workers()}] (at most 4 per core: "
                f"more only add memory), got {workers}"
            )
        self.job, self.workers = job, workers
        self._local = load_tokenizer(job.tokenizer, threads=1) if workers == 1 else None
        self._pool = None
        if workers > 1:
            context = worker_context()
            forkserver = context.get_start_method() == "forkserver"
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(job, None if forkserver else os.getpid()),
            )
            # The first task starts the workers (with fork, all of them): now,
            # before the caller starts threads of its own (tqdm's monitor).
            self._pool.submit(int)

    def map(self, tasks: Iterable[Task]) -> Iterator[Encoded]:
        if self._pool is None:
            for task in tasks:
                yield run_task(self._local, self.job, task)
            return
        inflight: collections.deque = collections.deque()
        try:
            for task in tasks:
                inflight.append(self._pool.submit(_run, task))
                if len(inflight) >= 2 * self.workers:
                    yield inflight.popleft().result()
            while inflight:
                yield inflight.popleft().result()
        except BrokenProcessPool:
            raise DataError(
                "a worker process died (out of memory?); retry with --workers 1"
            ) from None
        finally:
            for f in inflight:
                f.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BatchRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
