"""One training run, from a config to an exit code: `train`.

Order of work: check the output folders and lock both (checkpoints and logs),
decide what the run starts from (resume, rewind, refuse, start over:
`src.train.resume`), open the tokenizer and token files and check a resume
target against the config; only then delete (`--overwrite`) or move aside
(`--rewind`) what the plan says, so a refused run changes nothing. Every user
mistake is reported before any array is allocated. Then fix the step count of a
time budget, assemble the model, optimizer and compiled step
(`src.train.assembly`), restore the checkpoint into them (the schedule follows
the checkpoint's step even without optimizer state) or, for a new run from
another model (`training.init_from`, resolved with the config by
`src.train.init_from`), load the source's weights at step 0 with a fresh
optimizer and schedule; hand everything to the
loop (`src.train.trainer`), and write the report; one Ctrl-C or SIGTERM during
the report lets it finish (a second Ctrl-C quits at once). Logs go to
logs/<run>/, checkpoints to checkpoints/<run>/step_<N>/.

Data-parallel: rank 0 alone takes the locks, reads (or clears) checkpoints and
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
from ..checkpoint.contents import load_weights, open_checkpoint, source_record
from ..config import Config
from ..data.loader import TokenLoader
from ..errors import CheckpointError, ConfigError
from ..files import check_creatable, check_writable
from ..tokenizer.kinds import TokenizerLike, load_tokenizer
from . import autotune, budget, reporters
from .assembly import Assembly, assemble
from .distributed import ONE_PROCESS, Dist
from .lock import locked
from .logbook import FollowerLog, RunLog
from .resume import (
    check_resume_compatible,
    check_steps_left,
    config_changes,
    plan_start,
    schedule_jump,
)
from .signals import StopSignal
from .trainer import Inputs, Start, Trainer, loss_on_assistant


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def train(
    cfg: Config,
    resume: str | None = None,
    overwrite: bool = False,
    dist: Dist = ONE_PROCESS,
    rewind: bool = False,
) -> int:
    """Run (or continue) the training run `cfg` describes; returns the exit code."""
    started = time.monotonic()  # a time budget counts from here
    dist.local_accum(cfg.training.grad_accum_steps)  # a bad split: refused first
    if dist.main:  # a tracker's package missing: refused before anything is opened
        reporters.require(cfg.logging.report_to)
    ckpt_dir = Path(cfg.checkpoint.dir) / cfg.run_name
    log_dir = Path(cfg.logging.dir) / cfg.run_name
    if dist.main:  # C11 in the first second, before the token files are scanned
        for folder in (ckpt_dir, log_dir):
            check_creatable(folder)
    inputs = open_inputs(cfg)  # the data next: a wrong path creates no folder
    if not dist.main:  # ranks > 0 write nothing (and may not see rank 0's disk)
        with StopSignal() as stop:
            return _run(cfg, dist, FollowerLog(), None, None, inputs, stop, started)
    # Fail in the first second, not at the first save hours later (C11).
    for folder in (ckpt_dir, log_dir):
        check_writable(folder)
    with locked(ckpt_dir, log_dir):  # all a run writes: one run at a time
        plan = plan_start(ckpt_dir, log_dir, resume, overwrite, rewind, _warn)
        asked = cfg.training.init_from  # a resume keeps the run's own source
        inputs.resume_meta = check_resume(cfg, plan.resume, inputs.tokenizer, dist)
        notes = plan.apply()  # every check passed: now delete or move aside
        log = RunLog(log_dir, cfg.logging.progress_bar)
        if plan.note:
            log.info(plan.note)
        if asked and plan.resume is not None:
            log.info(
                "resuming: the weights are the checkpoint's, not init_from's "
                f"(this run started from {cfg.training.init_from})"
            )
        for note in notes:
            log.warn(note)
        if inputs.resume_meta is not None:
            tell_changes(inputs.resume_meta, cfg, log)
        with StopSignal() as stop:  # also over the report: Ctrl-C lets it finish
            code = _run(cfg, dist, log, ckpt_dir, plan.resume, inputs, stop, started)
            stop.notice = "finishing the report (the run is saved)"
            if report.after_training(log_dir, log) and code == 0:
                code = 2  # the run is saved, but a report could not be written
    return code


def open_inputs(cfg: Config) -> Inputs:
    """The tokenizer and token files of a run, checked (no resume target yet)."""
    m = cfg.model
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    if tokenizer.vocab_size > m.vocab_size:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size}, {cfg.data.tokenizer_path})"
        )
    sha = tokenizer.sha256  # token files made with another tokenizer: refused
    train = TokenLoader(cfg.data.train_path, m.context_length, m.vocab_size, sha)
    val = TokenLoader(cfg.data.val_path, m.context_length, m.vocab_size, sha)
    loss_on_assistant(cfg, train, val)  # loss_on=assistant without a mask: now
    return Inputs(tokenizer, train, val, None)


def check_resume(
    cfg: Config, path: Path | None, tokenizer: TokenizerLike, dist: Dist
) -> dict | None:
    """The meta of the checkpoint at `path` (None: a fresh start), refused when
    the run changed what it depends on or has nothing left to train."""
    if path is None:
        return None
    meta = store.read_meta(path)
    keep_source(meta, cfg, path)
    autotune.keep_recorded(meta, cfg)
    check_resume_compatible(meta, cfg, tokenizer.sha256, dist.world)
    check_steps_left(meta, cfg, path)
    return meta


def keep_source(meta: dict, cfg: Config, path: Path) -> None:
    """A resumed run keeps the source it started from (`training.init_from`, and
    its record in meta.json), whatever the config says now; naming a source for
    a run that started from scratch is refused (its weights are not that)."""
    saved = meta.get("config", {}).get("training", {}).get("init_from") or None
    if cfg.training.init_from and not saved:
        raise ConfigError(
            f"cannot resume {path} with --init-from/training.init_from: that run "
            "did not start from another model. Drop it to continue the run, or "
            "start a new run from this one with --set run_name=NEW"
        )
    cfg.training.init_from = saved
    if saved and isinstance(meta.get("init_from"), dict):
        source_record(saved, meta["init_from"])


def tell_changes(meta: dict, cfg: Config, log: RunLog) -> None:
    """Log how the config passed now differs from the checkpoint's, one
    `key: old -> new` line per key, and a learning rate that changes at the
    resume step (a warning when the schedule's shape changed)."""
    changes = config_changes(meta, cfg)
    if changes:
        log.info(
            f"resuming with {len(changes)} config change(s) since the checkpoint "
            f"(checkpoint -> now); {cfg.logging.dir}/{cfg.run_name}/config.yaml "
            "becomes the new config:"
        )
        for line in changes:
            log.info(f"  {line}")
    jump = schedule_jump(meta, cfg)
    if jump is not None:
        line, warning = jump
        (log.warn if warning else log.info)(line)


def restore(parts: Assembly, path: Path | None, log: RunLog) -> Start:
    """Load the checkpoint at `path`, verified when it was chosen
    (`plan_start`), into the assembled model and optimizer (in place); where
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
            log.warn(
                f"{path} has no optimizer state; {name} starts from zero (the "
                f"learning-rate schedule continues at step {ck.meta['step']})"
            )
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    log.info(f"resumed from {path} at step {ck.meta['step']}")
    return Start(int(ck.meta["step"]), ck.meta.get("best_val_loss") or math.inf)


def initialise(parts: Assembly, source: str, log: RunLog) -> Start:
    """Load the weights of `source` (checked when the config was resolved:
    `src.train.init_from`) into the assembled model; a new run at step 0, its
    optimizer and schedule fresh."""
    record = source_record(source)
    try:
        parts.model.load_weights(list(load_weights(source).items()), strict=True)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    log.info(
        f"initialised from {source} (its step {record.get('step')}): a new run "
        "at step 0, fresh optimizer, learning rate warming up from step 0"
    )
    return Start(0, math.inf)


def _run(
    cfg: Config,
    dist: Dist,
    log: RunLog,
    ckpt_dir: Path | None,
    resume_path: Path | None,
    inputs: Inputs,
    stop: StopSignal,
    started: float,
) -> int:
    policy_note = autotune.tune(cfg, dist.world)  # before the step is traced
    if cfg.training.time_budget_minutes > 0:  # before the schedule is built
        elapsed = time.monotonic() - started
        log.info(budget.fix_max_steps(cfg, inputs.resume_meta, dist, elapsed))
    parts = assemble(cfg, dist.group)
    if resume_path is None and cfg.training.init_from and dist.main:
        start = initialise(parts, cfg.training.init_from, log)
    else:
        start = restore(parts, resume_path, log)
    step = dist.broadcast_state(parts.model, parts.optimizer, start.step)
    start = Start(step, start.best)
    parts.optimizer.follow_run_step(step)  # before the compiled step first runs
    mx.eval(parts.model.parameters(), parts.optimizer.state)
    trainer = Trainer(cfg, parts, inputs, log, ckpt_dir, dist, stop, start)
    trainer.policy_note = policy_note
    return trainer.run()
