"""A new run from another model's weights: `--init-from PATH` (or
`training.init_from`), resolved into the run's config before anything else.

PATH is a checkpoint of ours (any run, any step; a run folder means its best,
else its latest) or a Hugging Face Llama/Qwen3 folder (`src.checkpoint.contents.
open_source`; its header only, the weights are read when the run starts). The
run takes the source's architecture and tokenizer:
- a model key the config leaves out (in the file and in `--set`) is the
  source's; one it gives must agree, else one ConfigError lists every key that
  differs (source value, given value). `context_length` may differ (RoPE has no
  weights: a shorter window is the usual fine-tune), and so may the training
  knobs `dropout`, `init_std` and `gradient_checkpointing`;
- `data.tokenizer_path` left out is the source's tokenizer; given, it must be the
  same tokenizer (sha256). A Hugging Face folder without one needs it given.
`training.init_from` becomes the source's resolved folder, which each checkpoint
records in meta.json with the source's step and tokenizer (`init_from`).

What the user wrote is read from the YAML and the `--set`s as text, before the
config is built, since a default that clashes with the source (n_heads=12 with a
64-wide source) must not fail the shape checks first.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..checkpoint.contents import Source, open_source
from ..config import (
    MAX_FILE_BYTES,
    Config,
    ModelConfig,
    load_config,
    parse_override,
    parse_yaml,
    validate,
)
from ..errors import ConfigError, UserError
from ..tokenizer.kinds import load_tokenizer

# The model keys a source decides (its weights' shapes and computation), each
# compared by its effective value (n_kv_heads None means n_heads).
ARCH = {
    "vocab_size": "vocab_size",
    "d_model": "d_model",
    "n_layers": "n_layers",
    "n_heads": "n_heads",
    "n_kv_heads": "kv_heads",
    "d_ff": "ffn_dim",
    "rope_theta": "rope_theta",
    "norm_eps": "norm_eps",
    "qk_norm": "qk_norm",
    "tie_embeddings": "tie_embeddings",
    "mlp": "mlp",
    "norm": "norm",
    "norm_position": "norm_position",
    "position": "position",
    "value_embeddings": "value_embeddings",
    "logit_softcap": "logit_softcap",
    "residual_scalars": "residual_scalars",
    "sliding_window": "sliding_window",
    "global_every": "global_every",
    "moe_experts": "moe_experts",
    "moe_top_k": "moe_top_k",
}
FREE = ("context_length",)  # taken from the source when left out, else as given


def written(config_path: str | Path, overrides: list[str]) -> dict[str, dict]:
    """{section: {key: raw value}} of what the config file and the `--set`s write
    (a value as text, not checked); {} for a file that cannot be read, which
    `load_config` then reports."""
    try:
        with open(config_path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        data = parse_yaml(raw[:MAX_FILE_BYTES].decode("utf-8-sig"))
    except (OSError, UnicodeError, yaml.YAMLError, ValueError):
        data = None
    data = data if isinstance(data, dict) else {}
    out = {k: dict(v) for k, v in data.items() if isinstance(v, dict)}
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except ConfigError:  # load_config says what is wrong with it
            continue
        if len(parts) == 2:
            out.setdefault(parts[0], {})[parts[1]] = value
    return out


def requested(config_path: str | Path, overrides: list[str], flag: str | None) -> str:
    """The source a run names: `--init-from` (`flag`), else `training.init_from`."""
    if flag:
        return flag
    value = written(config_path, overrides).get("training", {}).get("init_from")
    return (
        str(value) if isinstance(value, (str, int, float)) and value else ""
    )  # "": none


def resolve_config(
    config_path: str | Path, overrides: list[str], flag: str | None = None
) -> tuple[Config, Source | None]:
    """The run's config and the source it starts from (None: no `--init-from` nor
    `training.init_from`, the config as `load_config` reads it). A config that
    contradicts the source (a model key, the tokenizer) is a ConfigError naming
    every difference; nothing is allocated."""
    path = requested(config_path, overrides, flag)
    if not path:
        return load_config(config_path, overrides), None
    source = open_source(path)
    given = written(config_path, overrides)
    model_given = given.get("model", {})
    src = source.config.model
    fill = [
        f"model.{k}={json.dumps(getattr(src, k))}"
        for k in (*ARCH, *FREE)
        if k not in model_given
    ]
    cfg = load_config(config_path, [*overrides, *fill])
    where = f"--init-from {path}" if flag else f"training.init_from={path}"
    check_model(cfg.model, src, [k for k in ARCH if k in model_given], where)
    cfg.training.init_from = str(source.path)
    if "tokenizer_path" in given.get("data", {}):
        check_tokenizer(cfg.data.tokenizer_path, source, where)
    elif source.tokenizer_dir is None:
        raise ConfigError(
            f"{where}: {source.path} holds no tokenizer: name the one its model "
            "was trained with, with --set data.tokenizer_path=FOLDER"
        )
    else:
        cfg.data.tokenizer_path = str(source.tokenizer_dir)
    return validate(cfg), source


def check_model(
    model: ModelConfig, src: ModelConfig, keys: list[str], where: str
) -> None:
    """ConfigError listing each of `keys` whose value in `model` (the config's)
    differs from the source's `src`."""
    diffs = [
        f"model.{k}: source {getattr(src, ARCH[k])!r}, given {getattr(model, ARCH[k])!r}"
        for k in keys
        if getattr(model, ARCH[k]) != getattr(src, ARCH[k])
    ]
    if diffs:
        raise ConfigError(
            f"{where}: the config's model differs from the source's architecture "
            f"({'; '.join(diffs)}); leave these keys out to take the source's"
        )


def check_tokenizer(tokenizer_path: str, source: Source, where: str) -> None:
    """ConfigError unless the tokenizer at `tokenizer_path` is the source's (by
    sha256; for a source that records none, any that loads)."""
    try:
        sha = load_tokenizer(tokenizer_path).sha256
    except UserError as e:
        raise ConfigError(f"data.tokenizer_path={tokenizer_path}: {e}") from None
    if source.tokenizer_sha256 is not None and sha != source.tokenizer_sha256:
        raise ConfigError(
            f"{where}: data.tokenizer_path={tokenizer_path} is not the source's "
            f"tokenizer (sha256 {sha[:12]}..., the source's "
            f"{source.tokenizer_sha256[:12]}...); leave data.tokenizer_path out to "
            "use the source's"
        )
