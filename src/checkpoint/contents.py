"""What a checkpoint holds for a model, in one place: the meta it is written with
(`build_meta`) and the one way back to a config, weights, model and tokenizer
(`open_checkpoint`, `load_model`), for inference, evaluation, export and resume.

A checkpoint is named by its folder (`checkpoints/<run>/step_00000500`), a link
to one (`.../best`, `.../latest`), or its run folder (`checkpoints/<run>`), which
means its `best` checkpoint, else its `latest` (one stderr line says which). A
Hugging Face model folder (config.json + *.safetensors of a Llama or Qwen3, as
`python -m src.convert --from hf` takes) is read in memory as a checkpoint of step
0 (or the step our export stashed), through the same reader as that import
(`hf_folder`), its tokenizer its own folder's (`src.tokenizer.kinds`).

A run started from another model (`training.init_from`, `python -m src.train
--init-from PATH`) reads its source's header first (`open_source`: config, step,
tokenizer; no weights), then its weights (`load_weights`); each of its checkpoints
records the source (`init_from` in meta.json: path, step, tokenizer sha256).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..config import Config, config_from_dict
from ..errors import CheckpointError, ConfigError, TokenizerError, UserError
from ..model.transformer import Model
from ..tokenizer import kinds
from . import hf_folder, store

TOKENIZER_DIR = "tokenizer"


def build_meta(
    cfg: Config,
    tokenizer_sha256: str | None,
    tokenizer_kind: str | None = None,
    **fields,
) -> dict:
    """meta.json of a checkpoint of `cfg` (the store adds "step"): the resolved
    config, the seed, the tokenizer's sha256 and kind ("sentencepiece" or
    "huggingface", `src.tokenizer.kinds`; None: not said, i.e. sentencepiece, as
    before there were two), the MLX version, and `fields` (data position,
    validation loss, provenance...). A run started from another model also gets
    `init_from`, the record of its source (`source_record`)."""
    kind = {"tokenizer_kind": tokenizer_kind} if tokenizer_kind else {}
    source = cfg.training.init_from
    init = {"init_from": source_record(source)} if source else {}
    return {
        "config": cfg.to_dict(),
        "seed": cfg.training.seed,
        "tokenizer_sha256": tokenizer_sha256,
        **kind,
        "mlx_version": mx.__version__,
        **init,
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
    (empty for an imported model), meta, and the folder of its own tokenizer
    (`<checkpoint>/tokenizer`; a Hugging Face folder's is the folder itself)."""

    path: Path
    config: Config
    weights: dict[str, mx.array]
    optimizer: dict[str, mx.array]
    meta: dict
    tokenizer_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.tokenizer_dir is None:
            self.tokenizer_dir = self.path / TOKENIZER_DIR


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face model folder (config.json, no meta.json), not a checkpoint
    of ours nor a run folder."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "meta.json").exists()


def open_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Load a checkpoint, verified unless `verify` is False (see `locate`), or a
    Hugging Face model folder (`open_hf_folder`)."""
    if is_hf_folder(path):
        return open_hf_folder(path)
    path = locate(path, verify)
    weights, optimizer, meta = store.load_checkpoint(path, verify=False)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}/meta.json has no model config")
    config = config_from_dict(meta["config"])
    weights = {k: v.astype(mx.float32) for k, v in weights.items()}
    return Checkpoint(path, config, weights, optimizer, meta)


def open_hf_folder(path: str | Path) -> Checkpoint:
    """A Hugging Face Llama/Qwen3 folder as a checkpoint, in memory: the config and
    fp32 weights `python -m src.convert --from hf` would import (every value and
    tensor checked, ConvertError naming the file), no optimizer state, and a meta
    as that import writes it, with the sha256 and kind of the folder's tokenizer
    (none: None, and `load_tokenizer` says what to pass)."""
    folder = Path(path).resolve()
    cfg, step, weights = hf_folder.read_model(folder)
    try:
        tok = kinds.load_tokenizer(folder)
        sha, kind = tok.sha256, tok.kind
    except TokenizerError:  # said when a tokenizer is asked for
        sha = kind = None
    meta = build_meta(cfg, sha, kind, imported_from=str(folder), step=step)
    return Checkpoint(folder, cfg, weights, {}, meta, tokenizer_dir=folder)


@dataclass(frozen=True)
class Source:
    """What a new run starts from (`training.init_from`): the checkpoint folder
    (a run folder resolved to its best, else latest) or Hugging Face folder, its
    config (the model section is the architecture), its step, and its tokenizer
    (folder and sha256; None for a Hugging Face folder without one)."""

    path: Path
    config: Config
    step: int
    tokenizer_dir: Path | None
    tokenizer_sha256: str | None

    def record(self) -> dict:
        """What a run started from it writes in meta.json as `init_from`."""
        return {
            "path": str(self.path),
            "step": self.step,
            "tokenizer_sha256": self.tokenizer_sha256,
        }


def open_source(path: str | Path, verify: bool = True) -> Source:
    """The header of the model at `path` (a checkpoint of ours, verified unless
    `verify` is False, see `locate`; or a Hugging Face folder, its config.json
    checked): no weights are read. CheckpointError or ConvertError naming the
    path when it is neither."""
    if is_hf_folder(path):
        folder = Path(path).resolve()
        cfg, step = hf_folder.read_header(folder)
        try:
            tok = kinds.load_tokenizer(folder)
        except TokenizerError:  # the run must then name one (data.tokenizer_path)
            return Source(folder, cfg, step, None, None)
        return Source(folder, cfg, step, folder, tok.sha256)
    p = Path(path)
    marks = ("meta.json", *RUN_LINKS, store.COMMIT)  # what `locate` knows
    if p.is_dir() and not any((p / n).exists() for n in marks):
        if not store.list_checkpoints(p):
            raise CheckpointError(
                f"{p}: neither a checkpoint of ours (no meta.json), nor a run folder "
                "(no best or latest link), nor a Hugging Face model folder (no "
                "config.json): pass e.g. checkpoints/<run>, checkpoints/<run>/"
                "step_00000500, or a folder holding config.json and *.safetensors"
            )
    p = locate(p, verify)
    meta = store.read_meta(p)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{p}/meta.json has no model config")
    try:
        cfg = config_from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"{p}/meta.json: {e}") from None
    step, sha = int(meta.get("step") or 0), meta.get("tokenizer_sha256")
    own = p / TOKENIZER_DIR  # absent: e.g. imported from a folder without one
    return Source(p, cfg, step, own if own.is_dir() else None, sha)


def load_weights(path: str | Path) -> dict[str, mx.array]:
    """The fp32 weights alone of the checkpoint or Hugging Face folder `path`
    (already located and verified: `open_source`)."""
    if is_hf_folder(path):
        return hf_folder.read_model(path)[2]
    weights, _, _ = store.load_checkpoint(path, verify=False)
    return {k: v.astype(mx.float32) for k, v in weights.items()}


# Per process, the record of each source as it was when first read (at the start
# of the run): its later checkpoints say the same even if the source changes.
_RECORDS: dict[str, dict] = {}


def source_record(path: str, record: dict | None = None) -> dict:
    """The `init_from` record of the source at `path` (see `Source.record`);
    `record`, when given, is remembered as it (a resumed run's, from its
    checkpoint). A source that cannot be read any more is recorded by its path."""
    if record is not None:
        _RECORDS[path] = record
    if path not in _RECORDS:
        try:
            _RECORDS[path] = open_source(path, verify=False).record()
        except UserError:
            _RECORDS[path] = {"path": path}
    return _RECORDS[path]


def load_tokenizer(ck: Checkpoint, tokenizer_path: str | Path | None = None):
    """The checkpoint's own tokenizer, or `tokenizer_path` if it has the same
    vocabulary (a warning when it is not the one the model was trained with; for
    a model without a tokenizer of its own, any that fits its embedding), of
    either kind (`src.tokenizer.kinds`)."""
    own = ck.tokenizer_dir
    tokenizer: kinds.TokenizerLike = kinds.load_tokenizer(tokenizer_path or own)
    trained_sha = ck.meta.get("tokenizer_sha256")
    if tokenizer.sha256 != trained_sha and (trained_sha or not tokenizer_path):
        trained = kinds.load_tokenizer(own)
        if tokenizer.vocab_size != trained.vocab_size:
            raise ConfigError(
                f"tokenizer {tokenizer.dir} has {tokenizer.vocab_size} tokens but "
                f"the model in {ck.path} was trained with a {trained.vocab_size}-"
                "token tokenizer"
            )
        print(
            f"warning: {tokenizer.dir} is not the tokenizer {ck.path} was trained "
            "with (same vocabulary size)",
            file=sys.stderr,
        )
    if tokenizer.vocab_size > ck.config.model.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer.dir} has {tokenizer.vocab_size} tokens but the "
            f"model in {ck.path} has {ck.config.model.vocab_size} "
            "(model.vocab_size)"
        )
    return tokenizer


def load_model(path: str | Path, tokenizer_path: str | Path | None = None):
    """(model in eval mode, tokenizer, meta) of a checkpoint or a Hugging Face
    model folder (`open_checkpoint`)."""
    ck = open_checkpoint(path)
    tokenizer = load_tokenizer(ck, tokenizer_path)
    model = Model(ck.config.model)
    model.load_weights(list(ck.weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer, ck.meta
