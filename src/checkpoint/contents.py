"""What a checkpoint holds for a model, in one place: the meta it is written with
(`build_meta`) and the one way back to a config, weights, model and tokenizer
(`open_checkpoint`, `load_model`), for inference, evaluation, export and resume.

A checkpoint is named by its folder (`checkpoints/<run>/step_00000500`), a link
to one (`.../best`, `.../latest`), or its run folder (`checkpoints/<run>`), which
means its `best` checkpoint, else its `latest` (one stderr line says which).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..config import Config, config_from_dict
from ..errors import CheckpointError, ConfigError
from ..model.transformer import Model
from ..tokenizer.spm import Tokenizer
from . import store

TOKENIZER_DIR = "tokenizer"


def build_meta(cfg: Config, tokenizer_sha256: str | None, **fields) -> dict:
    """meta.json of a checkpoint of `cfg` (the store adds "step"): the resolved
    config, the seed, the tokenizer's sha256, the MLX version, and `fields` (data
    position, validation loss, provenance...)."""
    return {
        "config": cfg.to_dict(),
        "seed": cfg.training.seed,
        "tokenizer_sha256": tokenizer_sha256,
        "mlx_version": mx.__version__,
        **fields,
    }


RUN_LINKS = ("best", "latest")  # what a run folder means, in order of choice


def locate(path: str | Path, verify: bool = True) -> Path:
    """The checkpoint folder `path` names (a link is followed; a run folder means
    its `best`, else its `latest`, said on stderr), its checksums verified unless
    `verify` is False; CheckpointError when there is none, saying what to pass."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint folder")
    if not (p / "meta.json").exists():
        p = _in_run_folder(p)
    p = p.resolve()
    if verify:
        store.verify_checkpoint(p)
    return p


def _in_run_folder(p: Path) -> Path:
    """The checkpoint a folder without meta.json stands for: its `best` or
    `latest` link (a run folder), or `p` itself when it looks like a damaged
    checkpoint (COMMIT present), for verification to name what is missing."""
    for name in RUN_LINKS:
        if (p / name / "meta.json").exists():
            step = store.step_of((p / name).resolve())
            at = f" (step {step})" if step is not None else ""
            print(f"using {p / name}{at}", file=sys.stderr)
            return p / name
    if found := store.list_checkpoints(p):  # e.g. the rewound-* of a rewind
        raise CheckpointError(
            f"{p} holds checkpoints but no best or latest link: pass one, "
            f"e.g. {found[-1]}"
        )
    if (p / store.COMMIT).exists():
        return p
    raise CheckpointError(
        f"{p}: neither a checkpoint (no meta.json) nor a run folder (no best or "
        "latest link): pass a checkpoint folder, e.g. checkpoints/<run>/best or "
        "checkpoints/<run>/step_00000500, or a run folder, e.g. checkpoints/<run>"
    )


@dataclass
class Checkpoint:
    """A loaded checkpoint: its folder, config, fp32 weights, optimizer state
    (empty for an imported model) and meta."""

    path: Path
    config: Config
    weights: dict[str, mx.array]
    optimizer: dict[str, mx.array]
    meta: dict


def open_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Load a checkpoint, verified unless `verify` is False (see `locate`)."""
    path = locate(path, verify)
    weights, optimizer, meta = store.load_checkpoint(path, verify=False)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}/meta.json has no model config")
    config = config_from_dict(meta["config"])
    weights = {k: v.astype(mx.float32) for k, v in weights.items()}
    return Checkpoint(path, config, weights, optimizer, meta)


def load_tokenizer(ck: Checkpoint, tokenizer_path: str | Path | None = None):
    """The checkpoint's own tokenizer, or `tokenizer_path` if it has the same
    vocabulary (a warning when it is not the one the model was trained with)."""
    tokenizer = Tokenizer.load(tokenizer_path or ck.path / TOKENIZER_DIR)
    if tokenizer.sha256 != ck.meta.get("tokenizer_sha256"):
        trained = Tokenizer.load(ck.path / TOKENIZER_DIR)
        if tokenizer.vocab_size != trained.vocab_size:
            raise ConfigError(
                f"tokenizer {tokenizer.dir} has {tokenizer.vocab_size} tokens but the "
                f"model in {ck.path} was trained with a {trained.vocab_size}-token "
                "tokenizer"
            )
        print(
            f"warning: {tokenizer.dir} is not the tokenizer {ck.path} was trained "
            "with (same vocabulary size)",
            file=sys.stderr,
        )
    return tokenizer


def load_model(path: str | Path, tokenizer_path: str | Path | None = None):
    """(model in eval mode, tokenizer, meta) of a checkpoint."""
    ck = open_checkpoint(path)
    tokenizer = load_tokenizer(ck, tokenizer_path)
    model = Model(ck.config.model)
    model.load_weights(list(ck.weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer, ck.meta
