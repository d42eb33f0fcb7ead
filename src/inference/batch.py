"""A file of prompts, completed without losing what is made (`--prompts-file`).

Each result is written and flushed as soon as its batch is done, to stdout or a
new `--output` file (an existing file is never written over), so Ctrl-C, SIGTERM
or a failed write keep every result made before it. A signal never cuts a result
line in two: it waits until the line is written and counted. The prompts file
must be UTF-8; a bad byte is reported with its line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError, UserError
from ..files import write_failure
from .generate import Stats
from .sampling import Sampling
from .streaming import complete_prompts


def check_new_file(path: str) -> None:
    """UserError unless `path` can be created: results never replace a file."""
    if os.path.lexists(path):
        raise UserError(
            f"{path} already exists; results are never written over a file: "
            "choose another --output (or move that file away)"
        )
    if not Path(path).resolve().parent.is_dir():
        raise UserError(f"{path}: its folder does not exist")


def read_prompts(path: str) -> list[str]:
    """The lines of a UTF-8 prompts file; DataError naming the first bad line."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 text (byte 0x{data[e.start]:02x}"
            "); save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff").splitlines()


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM, stopping a run as Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Signals:
    """Within `with Signals() as sig`: SIGINT and SIGTERM raise `Stopped`, except
    inside `sig.held()`, which they wait for (a result line is written whole, and
    counted, or not at all). A SIGINT ignored by the parent stays ignored."""

    def __init__(self):
        self.holding, self.pending, self.old = False, None, {}

    def _handle(self, signum, _frame):
        if self.holding:
            self.pending = signum
        else:
            raise Stopped(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            raise Stopped(self.pending)

    def __enter__(self) -> Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def complete_file(
    model,
    tokenizer,
    prompts: list[str],
    s: Sampling,
    batch_size: int,
    output: str | None,
    show_stats: bool = False,
) -> int:
    """Complete `prompts`, writing and flushing each result as it is made to
    `output` (a new file: .jsonl, else text blocks) or stdout; the exit status.
    Ctrl-C or SIGTERM stop cleanly: the results written stay, one line on stderr
    says how many, and the status is 128 + the signal (130, 143)."""
    t0, stats, done, finished = time.perf_counter(), Stats(), 0, False
    jsonl = bool(output) and output.endswith(".jsonl")
    where = output or "stdout"
    try:
        out = open(output, "x", encoding="utf-8") if output else sys.stdout
    except FileExistsError:
        check_new_file(output)  # created since the check: say so
        raise
    try:
        with Signals() as sig:
            for r in complete_prompts(model, tokenizer, prompts, s, batch_size, stats):
                if jsonl:
                    line = json.dumps(r, ensure_ascii=False)
                else:
                    line = f"{r['prompt']}{r['completion']}\n---"
                with sig.held():
                    out.write(line + "\n")
                    out.flush()
                    done += 1
        finished = True
    except KeyboardInterrupt as exc:
        signum = signal.Signals(getattr(exc, "signum", signal.SIGINT))
        kept = f" (written to {where})" if done else ""
        print(
            f"stopped by {signum.name}: {done} of {len(prompts)} prompts "
            f"completed{kept}",
            file=sys.stderr,
        )
        return 128 + signum.value
    except OSError as exc:
        raise UserError(f"{write_failure(where, exc)} (after {done} results)") from exc
    finally:
        if out is not sys.stdout:
            out.close()
            if not (done or finished):  # stopped before any result: no file
                Path(output).unlink(missing_ok=True)
    if show_stats:  # tokens computed: a batch row decodes on after its EOS
        took = f"{len(prompts)} prompts in {time.perf_counter() - t0:.2f} s"
        print(f"[stats] {took}; {stats.summary()}", file=sys.stderr)
    return 0
