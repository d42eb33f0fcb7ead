"""One training run, from a config to an exit code: `train`.

Order of work: check the output folders and take the run lock, decide what the
run starts from (resume, refuse, start over), open the tokenizer and token files
and check a resume target against the config (every user mistake is reported
before any array is allocated), fix the step count of a time budget, assemble the
model, optimizer and compiled step (`src.train.assembly`), restore the
checkpoint into them, and hand everything to the loop (`src.train.trainer`).
Logs go to logs/<run>/, checkpoints to checkpoints/<run>/step_<N>/.

Data-parallel: rank 0 alone takes the lock, reads (or clears) checkpoints and
writes logs; the others keep a `FollowerLog` and receive rank 0's state.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import mlx.core as mx

from .. import report
from ..checkpoint import store
from ..checkpoint.contents import open_checkpoint
from ..config import Config
from ..data.tokens import TokenLoader
from ..errors import CheckpointError, ConfigError
from ..files import check_writable
from ..tokenizer.spm import Tokenizer
from . import budget
from .assembly import Assembly, assemble
from .distributed import ONE_PROCESS, Dist
from .lock import RunLock
from .logbook import FollowerLog, RunLog
from .resume import check_resume_compatible, resume_or_clear
from .signals import StopSignal
from .trainer import Inputs, Start, Trainer


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def train(
    cfg: Config,
    resume: str | None = None,
    overwrite: bool = False,
    dist: Dist = ONE_PROCESS,
) -> int:
    """Run (or continue) the training run `cfg` describes; returns the exit code."""
    dist.local_accum(cfg.training.grad_accum_steps)  # a bad split: refused first
    if not dist.main:  # ranks > 0 write nothing (and may not see rank 0's disk)
        return _run(cfg, dist, FollowerLog(), None, None)
    # Fail in the first second, not at the first save hours later (C11).
    ckpt_dir = check_writable(Path(cfg.checkpoint.dir) / cfg.run_name)
    log_dir = check_writable(Path(cfg.logging.dir) / cfg.run_name)
    with RunLock(ckpt_dir):
        resume_path = resume_or_clear(ckpt_dir, log_dir, resume, overwrite, _warn)
        log = RunLog(log_dir, cfg.logging.progress_bar)
        code = _run(cfg, dist, log, ckpt_dir, resume_path)
        report.after_training(log_dir, log)  # plot + report.md; only warns
    return code


def open_inputs(cfg: Config, resume_path: Path | None, dist: Dist) -> Inputs:
    """The tokenizer, token files and resume target of a run, checked."""
    m = cfg.model
    tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
    if tokenizer.vocab_size > m.vocab_size:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size}, {cfg.data.tokenizer_path})"
        )
    meta = None
    if resume_path is not None:
        meta = store.read_meta(resume_path)
        check_resume_compatible(meta, cfg, tokenizer.sha256, dist.world)
    sha = tokenizer.sha256  # token files made with another tokenizer: refused
    return Inputs(
        tokenizer,
        TokenLoader(cfg.data.train_path, m.context_length, m.vocab_size, sha),
        TokenLoader(cfg.data.val_path, m.context_length, m.vocab_size, sha),
        meta,
    )


def restore(parts: Assembly, path: Path | None, log: RunLog) -> Start:
    """Load the checkpoint at `path`, verified when it was chosen
    (`resume_or_clear`), into the assembled model and optimizer (in place); where
    the run starts. Nothing to load: step 0."""
    if path is None:
        return Start(0, math.inf)
    ck = open_checkpoint(path, verify=False)  # hashing it once is enough
    try:
        parts.model.load_weights(list(ck.weights.items()), strict=True)
        if ck.optimizer:
            parts.optimizer.load_state_dict(ck.optimizer)
        else:  # e.g. a checkpoint imported with `src.convert --from hf`
            name = type(parts.optimizer).__name__
            log.warn(f"{path} has no optimizer state; {name} starts from zero")
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    log.info(f"resumed from {path} at step {ck.meta['step']}")
    return Start(int(ck.meta["step"]), ck.meta.get("best_val_loss") or math.inf)


def _run(
    cfg: Config,
    dist: Dist,
    log: RunLog,
    ckpt_dir: Path | None,
    resume_path: Path | None,
) -> int:
    started = time.monotonic()  # a time budget counts from here
    inputs = open_inputs(cfg, resume_path, dist)
    with StopSignal() as stop:
        if cfg.training.time_budget_minutes > 0:  # before the schedule is built
            elapsed = time.monotonic() - started
            log.info(budget.fix_max_steps(cfg, inputs.resume_meta, dist, elapsed))
        parts = assemble(cfg, dist.group)
        start = restore(parts, resume_path, log)
        step = dist.broadcast_state(parts.model, parts.optimizer, start.step)
        start = Start(step, start.best)
        mx.eval(parts.model.parameters(), parts.optimizer.state)
        trainer = Trainer(cfg, parts, inputs, log, ckpt_dir, dist, stop, start)
        return trainer.run()
