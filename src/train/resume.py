"""Starting a run where it belongs: resume it, refuse, or start over.

`resume_or_clear` decides from `--resume` and `--overwrite` what the run starts
from; `check_resume_compatible` refuses a resume whose config changed what the
checkpoint's tensors, token stream or data position depend on, listing every
difference. Both run before anything is allocated.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..checkpoint import store as ckpt
from ..config import Config
from ..errors import ConfigError


def resume_or_clear(
    ckpt_dir: Path, log_dir: Path, resume: str | None, overwrite: bool, warn
) -> Path | None:
    """The checkpoint to resume from (`--resume auto|PATH`), or None for a fresh
    start: refused if the run already has checkpoints, unless `overwrite`, which
    empties the run's checkpoint and log folders (keeping the lock)."""
    existing = ckpt.list_checkpoints(ckpt_dir)
    if resume:
        return ckpt.resolve_resume(resume, ckpt_dir, warn=warn)
    if existing and not overwrite:
        raise ConfigError(
            f"{ckpt_dir} already has checkpoints (newest {existing[-1].name}); "
            "pass --resume auto to continue it, --overwrite to start over, "
            "or pick another name with --set run_name=NAME"
        )
    if overwrite:
        for folder in (ckpt_dir, log_dir):
            for path in folder.iterdir():
                if path.name == ".lock":
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    return None


# Keys that must not change across a resume: the saved tensors' shapes, the
# token stream, and the batch (which defines the data position of every step).
# Regularization and memory knobs may change freely.
_FROZEN = ("model.", "training.batch_size", "training.grad_accum_steps")
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


def check_resume_compatible(
    meta: dict, cfg: Config, tokenizer_sha256: str, world_size: int = 1
) -> None:
    """Raise ConfigError listing every frozen key whose value differs, and a change
    in the number of data-parallel ranks."""
    old, new = _flatten(meta.get("config", {})), _flatten(cfg.to_dict())
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
