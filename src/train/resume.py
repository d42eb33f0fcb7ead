"""Starting a run where it belongs: resume it, rewind it, refuse, or start over.

`plan_start` decides from `--resume`, `--rewind` and `--overwrite` what the run
starts from, and refuses what would lose or contradict work, changing nothing on
disk; `Plan.apply` makes it so once every other check has passed (the run's
folders locked, the config checked against the checkpoint by
`check_resume_compatible` and `check_steps_left`), before anything is allocated.

- A fresh start needs a run without checkpoints or logs, or `--overwrite`, which
  deletes only what a run writes (checkpoints, their links, logs, reports); a
  folder holding anything else is refused, naming it, and nothing is deleted.
- A resume from a checkpoint older than the run's newest valid one would make
  the newer ones lie: it needs `--rewind`, which moves them (and any damaged ones
  past it) to `<checkpoints>/rewound-<time>/` and points `latest` and `best` at
  what remains. The metrics rows past the checkpoint are dropped by the trainer
  (`RunLog.truncate_after`), so no step is logged twice.
- `--resume auto` on a run without any checkpoint folder starts it at step 0
  (the fresh start's checks apply), saying so.

A resumed run takes the config passed now; the checkpoint's resolved config is
what it is compared with (`config_changes`): a change of the model's shape, the
tokenizer, the batch or the number of ranks is refused
(`check_resume_compatible`); any other change is listed, one `key: old -> new`
line each, in train.log, and logs/<run>/config.yaml becomes the new config
(each checkpoint's meta.json keeps the config it was saved with). A change that
moves the learning rate at the resume step (`schedule_jump`) is said with the
lr before and after.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import store as ckpt
from ..config import Config, TrainingConfig
from ..errors import CheckpointError, ConfigError
from ..files import write_failure
from ..plot import DEFAULT_PNG
from .reporters import FOLDERS as TRACKER_FOLDERS
from .schedule import decay_start, lr_at

# What a run writes in its log folder (src.train.logbook, src.report, src.plot),
# with the temp names of src.files.atomic_file and of the logbook's truncation.
LOG_FILES = ("metrics.jsonl", "metrics.tmp", "train.log", "config.yaml",
             "report.md", DEFAULT_PNG, "compare.png")  # fmt: skip
_ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]+\.tmp$")
# In any run folder: the run lock and a start-up write probe (src.files).
_ANY_RUN = re.compile(r"^(\.lock|\.write-probe-\d+)$")
SHOWN = 5  # names listed in a refusal


def _any_run(p: Path) -> bool:
    return bool(_ANY_RUN.match(p.name))


def _log_file(p: Path) -> bool:
    """A file the logbook, report or plot writes (or their temp file), or the
    folder of an experiment tracker (`logging.report_to`: tensorboard/, wandb/)."""
    if p.name in TRACKER_FOLDERS and p.is_dir() and not p.is_symlink():
        return True
    m = _ATOMIC_TMP.match(p.name)
    name = m["name"] if m else p.name
    return name in LOG_FILES and (p.is_symlink() or not p.is_dir())


@dataclass
class Plan:
    """What a run starts from (`resume`: None for step 0), and what `apply`
    changes on disk first: folders to empty (`--overwrite`), or the step folders
    past `rewind_after` to move aside."""

    ckpt_dir: Path
    resume: Path | None = None
    clear: list[Path] = field(default_factory=list)
    rewind_after: int | None = None
    note: str | None = None  # a line to log about the choice (`--resume auto`)

    def apply(self) -> list[str]:
        """Delete or move as planned; the lines to log about it."""
        try:
            for folder in self.clear:
                for path in folder.iterdir():
                    if _any_run(path):
                        continue
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            if self.rewind_after is None:
                if self.resume is not None:  # true even after a crash mid-rewind
                    ckpt.relink(self.ckpt_dir)
                return []
            moved = ckpt.set_aside(self.ckpt_dir, self.rewind_after)
        except OSError as e:
            raise CheckpointError(write_failure(e.filename or self.ckpt_dir, e)) from e
        if moved is None:
            return []
        aside, names = moved
        return [
            f"rewound to step {self.rewind_after}: moved {_names(names)} to {aside} "
            "(nothing deleted); latest and best now name what remains"
        ]


def plan_start(
    ckpt_dir: Path,
    log_dir: Path,
    resume: str | None,
    overwrite: bool,
    rewind: bool,
    warn,
) -> Plan:
    """What the run starts from; refuses (a `UserError`) a fresh start over an
    existing run without `overwrite`, an `overwrite` of folders holding files a
    run does not write, and a resume to an older checkpoint without `rewind`."""
    existing = ckpt.step_folders(ckpt_dir)
    auto_fresh = resume == "auto" and not existing  # a new run: start it
    if resume and not auto_fresh:
        return _plan_resume(ckpt_dir, resume, rewind, warn)
    metrics = log_dir / LOG_FILES[0]
    if not overwrite and existing:
        raise ConfigError(
            f"{ckpt_dir} already has checkpoints (newest {existing[-1].name}); "
            "pass --resume auto to continue it, --overwrite to start over, "
            "or pick another name with --set run_name=NAME"
        )
    if not overwrite and metrics.is_file() and metrics.stat().st_size:
        instead = " instead of --resume auto" if auto_fresh else ""
        raise ConfigError(
            f"{log_dir} holds the logs of an earlier run ({metrics.name}) but "
            f"{ckpt_dir} has no checkpoint to resume: pass --overwrite{instead} to "
            "start over (deleting those logs), or pick another name with "
            "--set run_name=NAME"
        )
    if auto_fresh:
        note = f"--resume auto: {ckpt_dir} has no checkpoint yet; starting at step 0"
        return Plan(ckpt_dir, note=note)
    if not overwrite:
        return Plan(ckpt_dir)
    _refuse_strays(ckpt_dir, log_dir)
    folders = list(dict.fromkeys([ckpt_dir.resolve(), log_dir.resolve()]))
    return Plan(ckpt_dir, clear=folders)


def _refuse_strays(ckpt_dir: Path, log_dir: Path) -> None:
    """CheckpointError naming what in the run's folders a run does not write."""
    if ckpt_dir.resolve() == log_dir.resolve():
        found = ckpt.strays(ckpt_dir, lambda p: _any_run(p) or _log_file(p))
    else:
        found = ckpt.strays(ckpt_dir, _any_run)
        found += [
            p for p in sorted(log_dir.iterdir()) if not (_any_run(p) or _log_file(p))
        ]
    if not found:
        return
    shown = [f"{p}{'/' if p.is_dir() and not p.is_symlink() else ''}" for p in found]
    more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    raise CheckpointError(
        f"--overwrite refused, nothing deleted: {len(found)} file(s) that a training "
        f"run does not write: {', '.join(shown[:SHOWN])}{more}; move them away, or "
        "start the run under another name with --set run_name=NAME"
    )


def _plan_resume(ckpt_dir: Path, resume: str, rewind: bool, warn) -> Plan:
    # the store's fall-back lines say "warning:" themselves; `warn` does too
    path = ckpt.resolve_resume(
        resume, ckpt_dir, warn=lambda m: warn(m.removeprefix("warning: "))
    )
    try:
        step = int(ckpt.read_meta(path)["step"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/meta.json has no step number") from e
    newer = [p for p in ckpt.step_folders(ckpt_dir) if ckpt.step_of(p) > step]
    if not newer:
        return Plan(ckpt_dir, resume=path)
    names = _names([p.name for p in newer])
    if any(_verifies(p) for p in reversed(newer)):  # newest first: usually one
        if not rewind:
            raise ConfigError(
                f"{path} is at step {step}, but {ckpt_dir} has later checkpoints "
                f"({names}): training on from step {step} would abandon them. To do "
                f"that, add --rewind (they are moved to {ckpt_dir}/{ckpt.ASIDE}<time>/"
                ", nothing is deleted, and latest and best name what remains); to "
                "continue the run instead, use --resume auto"
            )
    else:  # only damaged ones: moved out of the way, or a later save would collide
        warn(
            f"the damaged checkpoint folder(s) past step {step} ({names}) are moved aside"
        )
    return Plan(ckpt_dir, resume=path, rewind_after=step)


def _names(names: list[str]) -> str:
    """'step_a, step_b' or, for many, 'step_a ... step_z (40 folders)'."""
    if len(names) <= SHOWN:
        return ", ".join(names)
    return f"{names[0]} ... {names[-1]} ({len(names)} folders)"


def _verifies(path: Path) -> bool:
    try:
        ckpt.verify_checkpoint(path)
    except CheckpointError:
        return False
    return True


def check_steps_left(meta: dict, cfg: Config, path: Path) -> None:
    """ConfigError when the checkpoint at `path` already reached the run's step
    count: resuming would train nothing (a time budget keeps the checkpoint's)."""
    step, t = int(meta.get("step", 0)), cfg.training
    if t.time_budget_minutes > 0:
        target = meta.get("config", {}).get("training", {}).get("max_steps") or 0
        if target and step >= target:
            raise ConfigError(
                f"{path} is at step {step}, the end of its time budget "
                f"(training.max_steps={target}): nothing left to train. To train "
                "further, pass --set training.time_budget_minutes=0 --set "
                f"training.max_steps=N with N above {step}"
            )
        return
    if step >= t.max_steps:
        where = "is" if step == t.max_steps else "is past"
        raise ConfigError(
            f"{path} is at step {step}, which {where} training.max_steps="
            f"{t.max_steps}: nothing left to train. To train further, set "
            f"training.max_steps above {step} (e.g. --set "
            f"training.max_steps={2 * step})"
        )


# Keys that must not change across a resume: the saved tensors' shapes, the
# token stream, and the batch (which defines the data position of every step).
# Regularization and memory knobs may change freely.
# the optimizer too: its state is the checkpoint's (`--init-from` starts afresh)
_FROZEN = ("model.", "training.batch_size", "training.grad_accum_steps",
           "training.optimizer")  # fmt: skip
_FREE = ("model.dropout", "model.gradient_checkpointing", "model.init_std")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _shown(v) -> str:
    """A config value as in YAML: text bare, numbers shortest, lists as JSON."""
    if isinstance(v, str):
        return v if v else "''"
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v)


def config_changes(meta: dict, cfg: Config) -> list[str]:
    """'key: checkpoint value -> value now', one per key that differs between the
    checkpoint's resolved config (a key it predates: its default) and `cfg`, in
    config order. With a time budget, max_steps is the checkpoint's (see
    `src.train.budget`), so it is no change."""
    old = _flatten(Config().to_dict()) | _flatten(meta.get("config", {}))
    new = _flatten(cfg.to_dict())
    if cfg.training.time_budget_minutes > 0:
        new["training.max_steps"] = old.get("training.max_steps")
    keys = list(new) + [k for k in old if k not in new]
    return [
        f"{k}: {_shown(old.get(k))} -> {_shown(new.get(k))}"
        for k in keys
        if old.get(k) != new.get(k)
    ]


# The keys the learning rate at a step depends on (src/train/schedule.py); the
# first two scale it, the others change the curve's shape.
_SCALE = ("learning_rate", "min_lr_ratio")
_SHAPE = ("max_steps", "warmup_steps", "schedule", "decay_fraction")


def schedule_jump(meta: dict, cfg: Config) -> tuple[str, bool] | None:
    """When the config now gives the checkpoint's step another learning rate than
    the checkpoint's config did: the line saying so (both values, the keys that
    changed), and whether it is a warning (the curve's shape changed, not only
    its scale). None when the rate continues unchanged."""
    step = int(meta.get("step", 0))
    saved = meta.get("config", {}).get("training", {})
    default = TrainingConfig()
    keys = _SCALE + _SHAPE
    before = dataclasses.replace(
        cfg.training, **{k: saved.get(k, getattr(default, k)) for k in keys}
    )
    now = cfg.training
    if now.time_budget_minutes > 0:  # the budget keeps the checkpoint's steps
        now = dataclasses.replace(now, max_steps=before.max_steps)
    old_lr, new_lr = lr_at(before, step), lr_at(now, step)
    if math.isclose(old_lr, new_lr, rel_tol=1e-6, abs_tol=0.0):
        return None
    changed = [k for k in keys if getattr(before, k) != getattr(now, k)]
    line = (
        f"the learning rate at step {step} changes from {old_lr:.4g} (the "
        f"checkpoint's schedule) to {new_lr:.4g} (changed: "
        f"{', '.join(f'training.{k}' for k in changed)})"
    )
    if "max_steps" in changed and now.schedule == "cosine":
        line += (
            "; a cosine schedule is stretched over the new max_steps from its "
            "start, so the rate jumps here (training.schedule=wsd extends a run "
            "that has not begun its decay without a jump)"
        )
    elif "max_steps" in changed and before.schedule == now.schedule == "wsd":
        line += (
            f"; the wsd decay had begun at step {decay_start(before)}: to extend "
            "without a jump, resume from a checkpoint before it (--resume "
            "PATH --rewind)"
        )
    return line, any(k in _SHAPE for k in changed)


def check_resume_compatible(
    meta: dict, cfg: Config, tokenizer_sha256: str, world_size: int = 1
) -> None:
    """Raise ConfigError listing every frozen key whose value differs, and a change
    in the number of data-parallel ranks."""
    # a key the checkpoint's config predates had its default then
    old = _flatten(Config().to_dict()) | _flatten(meta.get("config", {}))
    new = _flatten(cfg.to_dict())
    diffs = [
        f"  {k}: checkpoint {old.get(k)!r} -> now {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k.startswith(_FROZEN) and k not in _FREE and old.get(k) != new.get(k)
    ]
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        diffs.append(
            f"  tokenizer sha256: checkpoint {meta.get('tokenizer_sha256')} "
            f"-> now {tokenizer_sha256}"
        )
    if meta.get("world_size", 1) != world_size:
        diffs.append(
            f"  world size (data-parallel ranks): checkpoint {meta.get('world_size')} "
            f"-> now {world_size} (resume with as many ranks as the checkpoint)"
        )
    if diffs:
        raise ConfigError(
            "cannot resume: the run changed since the checkpoint\n" + "\n".join(diffs)
        )
