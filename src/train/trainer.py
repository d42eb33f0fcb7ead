"""The training loop: steps, logging, validation, samples and checkpoints.

`Trainer` receives everything it uses, assembled by `src.train.run`: the config,
the model and its compiled step (`Assembly`), the data (`Inputs`), the log, the
checkpoint folder and the data-parallel place of this process. Each step draws its
batch and its random seed from (seed, step), so a resumed run repeats the
uninterrupted one exactly; steps stay lazy `StepRecord`s until the next logging
boundary, so the loop syncs with the device once per step and reads values only
when it logs (and each step's ok flag, already evaluated with the step, for the
non-finite guard's limit). The first step compiles the step: it is announced,
timed, and kept out of tokens/s and the bar's ETA (but for a logging boundary on
it). SIGINT/SIGTERM (`StopSignal`) save at the next step boundary, after the
validation that step owes, so a checkpoint never lacks it.
A log, sample or config copy that cannot be written stops the run the same way
(the step reached is saved), with one `error:` line naming the file; a sample
prompt that fails is only a warning. The experiment trackers
(`logging.report_to`) are opened before the first step and closed on every way
out: finished, stopped, failed or interrupted.
Chat SFT: when `training.loss_on` resolves to assistant (`loss_on_assistant`),
each step reads the assistant mask of its windows with them and runs the masked
step, and validation scores the same tokens.
MatFormer (`model.matformer_widths`): `Assembly.step_for` gives each step its
width's step (sample mode), and validation adds `val_loss@f`/`val_bpb@f` for
each narrower width f to the eval row; the best checkpoint is the whole model's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm import tqdm

from ..backend import blas, policy
from ..checkpoint import store
from ..checkpoint.contents import build_meta
from ..cli import fmt_bytes
from ..config import Config, dump_config
from ..data.loader import TokenLoader
from ..errors import ConfigError, DataError
from ..eval.evaluator import Evaluator
from ..inference.generate import generate_tokens
from ..model import matformer
from ..tokenizer.kinds import TokenizerLike
from .assembly import Assembly
from .distributed import Dist
from .logbook import RunLog, StepRecord
from .signals import StopSignal
from .step import step_seed


@dataclass
class Inputs:
    """What a run reads, opened and checked before anything is allocated
    (`src.train.run.open_inputs`)."""

    tokenizer: TokenizerLike
    train_data: TokenLoader
    val_data: TokenLoader
    resume_meta: dict | None  # of rank 0's checkpoint to continue from


def loss_on_assistant(cfg: Config, train: TokenLoader, val: TokenLoader) -> bool:
    """`training.loss_on` resolved against the data: True for the assistant's
    tokens only (`assistant`, or `auto` on data with an assistant mask: `prepare
    --chat`), False for all. ConfigError when `assistant` finds no mask, or the
    validation file lacks the mask the training file has."""
    want = cfg.training.loss_on
    if want == "all" or (want == "auto" and not train.has_mask):
        return False
    if not train.has_mask:
        raise ConfigError(
            f"training.loss_on=assistant needs chat data with an assistant mask, "
            f"but {train.path} has none (make it with `python -m src.data prepare "
            "--chat`, or set training.loss_on=all)"
        )
    if not val.has_mask:
        raise ConfigError(
            f"training.loss_on={want}: {train.path} has an assistant mask but the "
            f"validation file {val.path} has none, so validation would score other "
            "tokens than training (prepare it with --chat, or set "
            "training.loss_on=all)"
        )
    return True


@dataclass(frozen=True)
class Start:
    """Where a run starts: the steps already done, and the best validation loss
    so far (inf when none)."""

    step: int
    best: float


class Trainer:
    def __init__(
        self,
        cfg: Config,
        parts: Assembly,
        inputs: Inputs,
        log: RunLog,
        ckpt_dir: Path | None,
        dist: Dist,
        stop: StopSignal,
        start: Start,
    ):
        t, m = cfg.training, cfg.model
        self.cfg, self.parts, self.inputs = cfg, parts, inputs
        self.log, self.ckpt_dir, self.dist, self.stop = log, ckpt_dir, dist, stop
        self.start, self.best = start.step, start.best
        self.policy_note: str | None = None
        self.accum = dist.local_accum(t.grad_accum_steps)  # micro-batches per rank
        self.rows = dist.rows(t.batch_size * self.accum)  # this rank's share
        self.tokens_per_step = t.batch_size * t.grad_accum_steps * m.context_length
        self.masked = loss_on_assistant(cfg, inputs.train_data, inputs.val_data)
        self.eval_fn = parts.masked_eval_fn if self.masked else parts.eval_fn
        self.evaluator = Evaluator(
            inputs.val_data,
            t.batch_size,
            cfg.eval.max_tokens,
            inputs.tokenizer.decode,
            masked=self.masked,
        )
        self.consecutive_bad = 0  # non-finite steps in a row
        self.failure_told = False  # the log's failure is said once
        self.saved = self.start  # the newest step on disk (a resume starts there)

    # ------------------------------------------------------------------ setup

    def announce(self) -> None:
        """The run's setup, on the console and in train.log; the resolved config
        to logs/<run>/config.yaml."""
        cfg, m, t = self.cfg, self.cfg.model, self.cfg.training
        data = self.inputs
        self.log.info(blas.describe())
        self.log.info(policy.describe(self.parts.streams))
        if self.policy_note:  # how the policy was chosen (src/train/autotune.py)
            self.log.info(self.policy_note)
        self.log.info(
            f"device {mx.default_device()}, compute {self.parts.compute_dtype}, "
            f"compiled step: {t.compile}"
        )
        self.log.info(
            f"model: {self.parts.model.num_params():,} parameters "
            f"(d={m.d_model}, layers={m.n_layers}, heads={m.n_heads}/{m.kv_heads}, "
            f"ffn={m.ffn_dim}, context={m.context_length}, vocab={m.vocab_size}); "
            f"training memory estimate ~{fmt_bytes(self.parts.memory_estimate(cfg))}"
        )
        self.log.info(self.parts.optimizer.describe())
        self.log.info(
            f"data: {data.train_data.n_tokens:,} train / {data.val_data.n_tokens:,} "
            f"val tokens; {self.tokens_per_step:,} tokens per step "
            f"({t.batch_size} x {t.grad_accum_steps} x {m.context_length}); "
            f"steps {self.start} -> {t.max_steps}"
        )
        if self.masked:
            n, total = data.train_data.mask.counted, max(data.train_data.n_tokens, 1)
            self.log.info(
                f"loss on the assistant's tokens only (training.loss_on="
                f"{t.loss_on}): {n:,} of {total:,} train tokens ({n / total:.0%}); "
                f"validation scores {self.evaluator.tokens:,} such targets"
            )
        if m.matformer_widths:
            self.log.info(matformer.describe(cfg))
        if self.dist.world > 1:
            self.log.info(f"data-parallel: {self.dist.world} ranks, {self.accum} x "
                          f"{t.batch_size} windows each per step")  # fmt: skip
        self.log.write_config(dump_config(cfg))

    # ------------------------------------------------------------------- loop

    def run(self) -> int:
        """`train`, with the run's experiment trackers (`logging.report_to`) open
        around it and closed however it ends; a tracker never fails a run."""
        self.log.report_to(self.cfg)  # a package not installed: a ConfigError
        try:
            code = self.train()
        except BaseException:
            self.log.close(1)
            raise
        self.log.close(code)
        return code

    def train(self) -> int:
        """Train from the start step to `max_steps` (or a stop); the exit code:
        0 finished, or stopped by a signal (saved);
        1 stopped by the non-finite guard (`training.max_consecutive_skips` steps
          in a row; nothing saved after the last good checkpoint);
        2 a log file could not be written (metrics.jsonl, train.log, config.yaml,
          a sample row: a full disk, an I/O error), or a token file changed in
          place under the run: the step reached is saved, `--resume auto`
          continues once the cause is fixed."""
        self.announce()
        self.log.begin(self.start)
        if self.log.failure:  # nothing trained yet, so nothing to save
            self.log.error(f"{self.log.failure}; stopping before the first step")
            return 2
        cfg, t = self.cfg, self.cfg.training
        bar = self.log.progress(self.start, t.max_steps)
        pending: list[StepRecord] = []
        meter = _Meter(self.start)
        step, stopping = self.start, False
        if t.compile:  # the first step compiles: seconds to minutes, unsaid otherwise
            self.log.info("compiling the training step...")
        while step < t.max_steps and not stopping:
            try:
                record, stop = self._step(step)
            except DataError as exc:  # read before the step used it: `step` is whole
                return self._stop_on_data(exc, step, pending, meter, bar)
            step += 1
            if step == self.start + 1:  # compiled: its buffers are reused from now
                policy.keep_step_buffers()  # on, its time is kept out of any rate
                self.log.first_step(bar, step, meter.elapsed() if t.compile else None)
            else:
                bar.update(1)
            pending.append(record)
            if self._too_many_skips(record):  # checked every step, before any save
                self._flush(step, pending, meter, bar)
                return self._stop_non_finite(step)

            final = step == t.max_steps
            eval_now = final or (cfg.eval.interval and step % cfg.eval.interval == 0)
            save_now = final or (
                cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0
            )
            if step % cfg.logging.interval == 0 or eval_now or save_now:
                self._flush(step, pending, meter, bar)
            # A stop at an eval step validates first: its checkpoint keeps the
            # val_loss (a resume starts after it, so it would never be run).
            try:
                metric = self._evaluate(step) if eval_now else None
            except DataError as exc:  # the validation file changed under the run
                return self._stop_on_data(exc, step, pending, meter, bar)
            stopping = self._stopping(stop)  # one process: also a signal during eval
            if save_now or stopping:
                self._flush(step, pending, meter, bar)
                self._tell_log_failure(step)  # before the save, which may fail too
                self._save(step, metric)
            if eval_now or save_now or step == self.start + 1:
                meter.restart(step)  # keep eval/save and compiling out of tokens/s
        bar.close()
        if self.log.failure:  # e.g. train.log failed while the last step was saved
            self._tell_log_failure(step)
            self.log.info(f"--resume auto continues from step {step} once it can write")
            return 2
        if stopping:
            self.log.info(f"stopped by signal; saved step {step}")
        return 0

    def _step(self, step: int) -> tuple[StepRecord, mx.array]:
        """Run optimizer step `step` (0-based); its record, and whether any rank
        was asked to stop when it began."""
        t = self.cfg.training
        n = t.batch_size * t.grad_accum_steps
        if self.masked:
            batch, mask = self.inputs.train_data.batch(
                t.seed, step, n, self.rows, with_mask=True
            )
            mask = mx.array(mask.reshape(self.accum, t.batch_size, -1))
        else:
            batch = self.inputs.train_data.batch(t.seed, step, n, self.rows)
        batch = mx.array(batch.reshape(self.accum, t.batch_size, -1), dtype=mx.int32)
        mx.random.seed(step_seed(t.seed, step, self.dist.rank))
        train_step = self.parts.step_for(step, self.masked)  # MatFormer: a width's
        if self.masked:
            loss, grad_norm, ok = train_step(batch, mask)
        else:
            loss, grad_norm, ok = train_step(batch)
        lr = self.parts.optimizer.current_lr
        # Ranks must stop at the same step: the flags they had when the step
        # began are summed with it (no extra sync); see _stopping. Rank 0's log
        # failing stops them all, like a signal.
        stop = self.dist.any(self.stop.requested or self.log.failure is not None)
        state = (self.parts.model.state, self.parts.optimizer.state)
        mx.eval(state, loss, grad_norm, ok, lr, stop)
        return StepRecord(step + 1, loss, grad_norm, ok, lr), stop

    def _stopping(self, stop: mx.array) -> bool:
        """Whether to save and stop now. Ranks use the flags summed with the step;
        one process also takes a signal that came during the step, or a log
        write that failed, at once."""
        if self.dist.world == 1:
            return self.stop.requested or self.log.failure is not None
        return stop.item()

    def _too_many_skips(self, record: StepRecord) -> bool:
        """Count non-finite steps in a row; True at the limit. `ok` was evaluated
        with the step (and is the same on every rank): reading it does not wait."""
        self.consecutive_bad = 0 if record.ok.item() else self.consecutive_bad + 1
        return self.consecutive_bad >= self.cfg.training.max_consecutive_skips

    def _stop_non_finite(self, step: int) -> int:
        n, limit = self.consecutive_bad, self.cfg.training.max_consecutive_skips
        self.log.error(
            f"stopping at step {step}: {n} consecutive steps with a non-finite loss "
            f"or gradient (steps {step - n + 1}-{step}; training.max_consecutive_"
            f"skips={limit}); nothing saved after the last checkpoint; lower the "
            "learning rate or check the data"
        )
        return 1

    def _stop_on_data(
        self, exc: DataError, step: int, pending: list, meter: _Meter, bar: tqdm
    ) -> int:
        """A token file changed in place under the run (the loader refuses to read
        unchecked ids): save the step reached, say why, exit 2. Ranks may meet it
        at different steps, so there the job fails as when a rank dies."""
        if self.dist.world > 1:
            raise exc
        self._flush(step, pending, meter, bar)
        bar.close()
        try:
            if step > self.saved:
                self._save(step, None)
        finally:  # the last line, even when the save fails too
            self.log.error(f"{exc}; stopping at step {step} (saved)")
        return 2

    def _tell_log_failure(self, step: int) -> None:
        """If a log write failed, say so once: the one `error:` line of the run."""
        if self.log.failure and not self.failure_told:
            self.failure_told = True
            self.log.error(f"{self.log.failure}; stopping at step {step}")

    def _flush(self, step: int, pending: list, meter: _Meter, bar: tqdm) -> None:
        """Write the buffered step rows (and empty `pending`)."""
        if not pending:
            return
        tps = self.tokens_per_step * meter.steps_per_s(step)
        self.log.flush_steps(pending, tps, self.cfg.training.spike_factor, bar)
        pending.clear()
        meter.restart(step)

    def _evaluate(self, step: int) -> float:
        model = self.parts.model
        model.eval()
        try:
            result = self.evaluator(self.eval_fn, self.dist.rank, self.dist.world)
            row = {**result.as_dict(), **self._width_metrics()}
        finally:
            model.train()
        self.log.eval_row(step, row)
        if self.parts.width_evals:  # the eval row's line says the whole model's
            bpb = [f"{k[8:]} {v:.4f}" for k, v in row.items() if k[:8] == "val_bpb@"]
            self.log.info(f"step {step}: val bpb by FFN width: {', '.join(bpb)}")
        if not (self.cfg.eval.sample_tokens and self.dist.main):
            return result.loss
        for prompt in self.cfg.eval.sample_prompts:
            try:
                text = self.sample(prompt)
            except Exception as exc:  # a sample is a courtesy: never lose a step to it
                self.log.warn(
                    f"step {step}: no sample for the prompt {prompt[:60]!r}: "
                    f"{type(exc).__name__}: {exc}"
                )
                continue
            self.log.sample(step, prompt, text)
        return result.loss

    def _width_metrics(self) -> dict:
        """MatFormer: val_loss@f and val_bpb@f of each narrower FFN width f."""
        row = {}
        for w, fns in self.parts.width_evals.items():
            at = self.evaluator(fns[self.masked], self.dist.rank, self.dist.world)
            key = matformer.width_key(w)
            row[f"val_loss@{key}"], row[f"val_bpb@{key}"] = at.loss, at.bits_per_byte
        return row

    def sample(self, prompt: str) -> str:
        """A continuation of `prompt` with the run's sampling settings."""
        e, tok, model = self.cfg.eval, self.inputs.tokenizer, self.parts.model
        model.eval()
        try:  # dropout back on whatever happens: training goes on after a sample
            out = generate_tokens(
                model,
                tok.encode(prompt),
                e.sample_tokens,
                e.temperature,
                seed=self.cfg.training.seed,
                eos_id=tok.eos_id,
                n_vocab=tok.vocab_size,
            )
            return tok.decode(list(out))
        finally:
            model.train()

    def _save(self, step: int, metric: float | None) -> None:
        cfg, model = self.cfg, self.parts.model
        if self.dist.world > 1:  # rank 0 writes; the others wait at the barrier
            self.log.info(self.dist.check_in_sync(step, model.parameters()))
            if not self.dist.main:
                self.dist.barrier()
                return
        if metric is not None and metric < self.best:
            self.best = metric
        tok, train_meta = self.inputs.tokenizer, self.inputs.train_data.meta or {}
        meta = build_meta(
            cfg,
            tok.sha256,
            tok.kind,
            data_position={"seed": cfg.training.seed, "next_step": step},
            # trained on conversations (prepare --chat): the REPL's `auto` template
            chat_template=bool(train_meta.get("chat_template")),
            world_size=self.dist.world,
            val_loss=metric,
            best_val_loss=self.best if math.isfinite(self.best) else None,
        )
        path = store.save_checkpoint(
            self.ckpt_dir,
            step,
            dict(tree_flatten(model.parameters())),
            self.parts.optimizer.state_dict(),
            meta,
            tokenizer=tok,
            keep_last=cfg.checkpoint.keep_last,
            metric=metric,
        )
        self.saved = step
        self.log.info(f"saved {path}")
        self.dist.barrier()  # a failed save fails every rank, not only rank 0


class _Meter:
    """Tokens/s between logging boundaries: steps since `restart`, over the time."""

    def __init__(self, step: int):
        self.restart(step)

    def restart(self, step: int) -> None:
        self.tic, self.step = time.perf_counter(), step

    def elapsed(self) -> float:
        return time.perf_counter() - self.tic

    def steps_per_s(self, step: int) -> float:
        return (step - self.step) / max(self.elapsed(), 1e-9)
