"""Train a model: `python -m src.train --config configs/tiny.yaml`.

Order of work: resolve the config, check the output folders, take the run lock,
check a resume target against the config, open the tokenizer and token files
(every user mistake is reported before any array is allocated), then build the
model and run the compiled step. Logs go to logs/<run>/, checkpoints to
checkpoints/<run>/step_<N>/. SIGINT/SIGTERM finish the current step, save and
exit 0; a second Ctrl-C exits at once (the last committed checkpoint stays valid).

Data-parallel: `--nproc N` launches N ranks on this machine (src/launch.py); a
process started by `mlx.launch` joins its ring (src/distributed.py). Only rank 0
takes the run lock and writes logs and checkpoints.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import blas, budget, distributed, report
from . import checkpoint as ckpt
from .config import Config, ConfigError, dump_config, load_config
from .distributed import ONE_PROCESS, Dist
from .eval import Evaluator
from .generate import generate_tokens
from .launch import add_launch_arguments, launch
from .model import Model, estimate_training_memory
from .optim import build_optimizer, load_optimizer_state
from .rundir import RunLock, check_writable, resume_or_clear
from .runlog import RunLog, StopSignal, check_resume_compatible, fmt_bytes
from .step import (
    keep_step_buffers,
    make_eval_fn,
    make_train_step,
    resolve_precision,
    resolve_streams,
    step_seed,
)
from .tokenizer import Tokenizer, TokenizerError
from .tokens import DataError, TokenLoader

USER_ERRORS = (ConfigError, DataError, TokenizerError, ckpt.CheckpointError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m src.train",
        description="Train a GPT-style language model with MLX.",
        epilog="Example: python -m src.train --config configs/tiny.yaml "
        "--set training.learning_rate=3e-4 --resume auto",
    )
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. training.max_steps=200 (repeatable)",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue a run: 'auto' = newest valid checkpoint of this run, "
        "or a checkpoint folder (e.g. checkpoints/<run>/latest)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start from scratch even if this run already has checkpoints "
        "(deletes them and the run's logs)",
    )
    p.add_argument(
        "--show-config",
        action="store_true",
        help="print the resolved config (every key, with defaults and overrides) and exit",
    )
    add_launch_arguments(p)  # --nproc, --start-timeout
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.show_config:
            print(dump_config(cfg), end="")
            return 0
        if args.nproc > 1:
            return launch(argv, args.nproc, cfg)
        dist = distributed.init(cfg, args.start_timeout)
        return train(cfg, args.resume, args.overwrite, dist)
    except USER_ERRORS as exc:
        print(f"error{distributed.rank_tag()}: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # distributed: e.g. another rank died
        return distributed.report_failure(exc)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def train(
    cfg: Config,
    resume: str | None = None,
    overwrite: bool = False,
    dist: Dist = ONE_PROCESS,
) -> int:
    """Run (or continue) the training run `cfg` describes; returns the exit code."""
    if not dist.main:  # ranks > 0 write nothing (and may not see rank 0's disk)
        return Trainer(cfg, None, None, None, False, dist).run()
    # Fail in the first second, not at the first save hours later (C11).
    ckpt_dir = check_writable(Path(cfg.checkpoint.dir) / cfg.run_name)
    log_dir = check_writable(Path(cfg.logging.dir) / cfg.run_name)
    with RunLock(ckpt_dir):
        return Trainer(cfg, ckpt_dir, log_dir, resume, overwrite, dist).run()


class Trainer:
    def __init__(
        self,
        cfg: Config,
        ckpt_dir: Path,
        log_dir: Path,
        resume: str | None = None,
        overwrite: bool = False,
        dist: Dist = ONE_PROCESS,
    ):
        self.started = time.monotonic()  # a time budget counts from here
        self.cfg, self.dist = cfg, dist
        t, m = cfg.training, cfg.model
        self.accum = dist.local_accum(t.grad_accum_steps)  # micro-batches per rank
        self.ckpt_dir, self.log_dir = ckpt_dir, log_dir
        self.resume_path = None  # rank 0 alone reads (or clears) checkpoints
        if dist.main:
            self.resume_path = resume_or_clear(
                ckpt_dir, log_dir, resume, overwrite, _warn
            )

        self.tokenizer = Tokenizer.load(cfg.data.tokenizer_path)
        if self.tokenizer.vocab_size > m.vocab_size:
            raise ConfigError(
                f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({self.tokenizer.vocab_size}, {cfg.data.tokenizer_path})"
            )
        self.resume_meta = None
        if self.resume_path is not None:
            self.resume_meta = ckpt.read_meta(self.resume_path)
            check_resume_compatible(
                self.resume_meta, cfg, self.tokenizer.sha256, dist.world
            )
        sha = self.tokenizer.sha256  # token files made with another tokenizer: refused
        self.train_data = TokenLoader(
            cfg.data.train_path, m.context_length, m.vocab_size, sha
        )
        self.val_data = TokenLoader(
            cfg.data.val_path, m.context_length, m.vocab_size, sha
        )
        if dist.main:
            self.log = RunLog(self.log_dir, cfg.logging.progress_bar)
        else:
            self.log = distributed.FollowerLog()
        self.stop = StopSignal()
        self.tokens_per_step = t.batch_size * t.grad_accum_steps * m.context_length

    # ------------------------------------------------------------------ setup

    def _build(self) -> int:
        cfg, t = self.cfg, self.cfg.training
        if t.time_budget_minutes > 0:  # before the LR schedule is built
            elapsed = time.monotonic() - self.started
            self.log.info(
                budget.fix_max_steps(cfg, self.resume_meta, self.dist, elapsed)
            )
        mx.random.seed(t.seed)
        self.model = Model(cfg.model)
        self.optimizer = build_optimizer(self.model, t)
        start = 0
        if self.resume_path is not None:
            weights, opt_state, meta = ckpt.load_checkpoint(self.resume_path)
            try:
                self.model.load_weights(list(weights.items()), strict=True)
                params = self.model.trainable_parameters()
                if opt_state:
                    load_optimizer_state(self.optimizer, opt_state, params)
                else:  # e.g. a checkpoint imported with `src.convert --from hf`
                    self.log.warn(
                        f"{self.resume_path} has no optimizer state; "
                        "AdamW starts from zero moments"
                    )
            except ValueError as exc:
                raise ckpt.CheckpointError(f"{self.resume_path}: {exc}") from None
            start = int(meta["step"])
            self.best = meta.get("best_val_loss") or math.inf
            self.log.info(f"resumed from {self.resume_path} at step {start}")
        else:
            self.best = math.inf
        start = self.dist.broadcast_state(self.model, self.optimizer, start)
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.compute_dtype = dtype = resolve_precision(t.precision)
        self.train_step = make_train_step(
            self.model, self.optimizer, t, dtype, t.compile, self.dist.group
        )
        streams = resolve_streams(t.streams, self.dist.world)
        self.eval_fn = make_eval_fn(self.model, t.compile, streams)
        self.evaluator = Evaluator(
            self.val_data, t.batch_size, cfg.eval.max_tokens, self.tokenizer.decode
        )
        return start

    def _announce(self, start: int) -> None:
        cfg, m, t = self.cfg, self.cfg.model, self.cfg.training
        est = estimate_training_memory(m, t.batch_size)
        self.log.info(blas.describe())
        self.log.info(
            f"device {mx.default_device()}, compute {self.compute_dtype}, "
            f"compiled step: {t.compile}"
        )
        self.log.info(
            f"model: {self.model.num_params():,} parameters "
            f"(d={m.d_model}, layers={m.n_layers}, heads={m.n_heads}/{m.kv_heads}, "
            f"ffn={m.ffn_dim}, context={m.context_length}, vocab={m.vocab_size}); "
            f"training memory estimate ~{fmt_bytes(est)}"
        )
        self.log.info(
            f"data: {self.train_data.n_tokens:,} train / {self.val_data.n_tokens:,} val "
            f"tokens; {self.tokens_per_step:,} tokens per step "
            f"({t.batch_size} x {t.grad_accum_steps} x {m.context_length}); "
            f"steps {start} -> {t.max_steps}"
        )
        if self.dist.world > 1:
            self.log.info(f"data-parallel: {self.dist.world} ranks, {self.accum} x "
                          f"{t.batch_size} windows each per step")  # fmt: skip
        self.log.write_config(dump_config(cfg))

    # ------------------------------------------------------------------- loop

    def run(self) -> int:
        with self.stop:
            start = self._build()
            self._announce(start)
            self.log.truncate_after(start)
            code = self._loop(start)
        if self.dist.main:  # plot + report.md; only warns
            report.after_training(self.log_dir, self.log)
        return code

    def _loop(self, start: int) -> int:
        cfg, t = self.cfg, self.cfg.training
        self.bar = self.log.progress(start, t.max_steps)
        self.pending: list[tuple[int, mx.array, mx.array, mx.array, mx.array]] = []
        self.consecutive_bad = 0
        self.tic, self.tic_step = time.perf_counter(), start
        rows = self.dist.rows(t.batch_size * self.accum)  # this rank's share
        step, stopping = start, False
        while step < t.max_steps and not stopping:
            batch = self.train_data.batch(
                t.seed, step, t.batch_size * t.grad_accum_steps, rows
            )
            batch = batch.reshape(self.accum, t.batch_size, -1)
            mx.random.seed(step_seed(t.seed, step, self.dist.rank))
            loss, grad_norm, ok = self.train_step(mx.array(batch, dtype=mx.int32))
            lr = self.optimizer.learning_rate
            # Ranks must stop at the same step: the flags they had when the step
            # began are summed with it (no extra sync); see _stopping.
            stop = self.dist.any(self.stop.requested)
            mx.eval(
                self.model.state, self.optimizer.state, loss, grad_norm, ok, lr, stop
            )
            stopping = self._stopping(stop)
            if step == start:  # the first step's buffers are reused from now on
                keep_step_buffers()
            step += 1
            self.bar.update(1)
            self.pending.append((step, loss, grad_norm, ok, lr))

            final = step == t.max_steps
            eval_now = final or (cfg.eval.interval and step % cfg.eval.interval == 0)
            save_now = final or (
                cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
            )
            if step % cfg.logging.interval == 0 or eval_now or save_now:
                if not self._flush(step):
                    return 1
            metric = None
            if eval_now and not stopping:  # a stop saves without eval
                metric = self._evaluate(step)
            stopping = self._stopping(stop)  # one process: also a signal during eval
            if save_now or stopping:
                if not self._flush(step):
                    return 1
                self._save(step, metric)
            if eval_now or save_now:
                self.tic = time.perf_counter()  # keep eval/save out of tokens/s
        self.bar.close()
        if stopping:
            self.log.info(f"stopped by signal; saved step {step}")
        return 0

    def _stopping(self, stop: mx.array) -> bool:
        """Whether to save and stop now. Ranks use the flags summed with the step;
        one process also takes a signal that came during the step at once."""
        return self.stop.requested if self.dist.world == 1 else stop.item()

    def _flush(self, step: int) -> bool:
        """Write the buffered step rows; False when too many steps in a row failed."""
        if not self.pending:
            return True
        t = self.cfg.training
        elapsed = time.perf_counter() - self.tic
        tps = self.tokens_per_step * (step - self.tic_step) / max(elapsed, 1e-9)
        self.consecutive_bad = self.log.flush_steps(
            self.pending, tps, self.consecutive_bad, t.spike_factor, self.bar
        )
        self.pending = []
        self.tic, self.tic_step = time.perf_counter(), step
        if self.consecutive_bad >= t.max_consecutive_skips:
            self.log.error(
                f"stopping: {self.consecutive_bad} consecutive steps with a non-finite "
                f"loss or gradient (up to step {step}); lower the learning rate "
                "or check the data"
            )
            return False
        return True

    def _evaluate(self, step: int) -> float:
        self.model.eval()
        result = self.evaluator(self.eval_fn, self.dist.rank, self.dist.world)
        self.model.train()
        self.log.eval_row(step, result.as_dict())
        for prompt in self.cfg.eval.sample_prompts:
            if self.cfg.eval.sample_tokens and self.dist.main:
                self.log.sample(step, prompt, self.sample(prompt))
        return result.loss

    def sample(self, prompt: str) -> str:
        e = self.cfg.eval
        self.model.eval()
        ids = self.tokenizer.encode(prompt)
        out = generate_tokens(
            self.model,
            ids,
            e.sample_tokens,
            e.temperature,
            seed=self.cfg.training.seed,
            eos_id=self.tokenizer.eos_id,
        )
        text = self.tokenizer.decode(list(out))
        self.model.train()
        return text

    def _save(self, step: int, metric: float | None) -> None:
        cfg = self.cfg
        if self.dist.world > 1:  # rank 0 writes; the others wait at the barrier
            self.log.info(self.dist.check_in_sync(step, self.model.parameters()))
            if not self.dist.main:
                self.dist.barrier()
                return
        if metric is not None and metric < self.best:
            self.best = metric
        meta = {
            "config": cfg.to_dict(),
            "step": step,
            "data_position": {"seed": cfg.training.seed, "next_step": step},
            "seed": cfg.training.seed,
            "tokenizer_sha256": self.tokenizer.sha256,
            # trained on conversations (prepare --chat): the REPL's `auto` template
            "chat_template": bool((self.train_data.meta or {}).get("chat_template")),
            "world_size": self.dist.world,
            "val_loss": metric,
            "best_val_loss": self.best if math.isfinite(self.best) else None,
            "mlx_version": mx.__version__,
        }
        path = ckpt.save_checkpoint(
            self.ckpt_dir,
            step,
            dict(tree_flatten(self.model.parameters())),
            dict(tree_flatten(self.optimizer.state)),
            meta,
            tokenizer_dir=self.tokenizer.dir,
            keep_last=cfg.checkpoint.keep_last,
            metric=metric,
        )
        self.log.info(f"saved {path}")
        self.dist.barrier()  # a failed save fails every rank, not only rank 0


if __name__ == "__main__":
    raise SystemExit(main())
