"""Typed run configuration loaded from YAML, with `--set` overrides and checks.

A config file is a mapping of the sections below; a key left out falls back to the
dataclass default, but the file may not be empty and a section must be a mapping.
Every field carries its rule (`num`, `choice`, `choices`, `_folder_name`): each
number must be finite and in its range, each string valid UTF-8 without NUL,
before any array exists; unknown keys, wrong types and impossible shapes raise
`ConfigError` naming the key, the value and the rule. The YAML reader refuses what
a config never needs and a hostile file abuses: aliases (an alias bomb), repeated
keys, non-string keys. This package imports neither MLX nor torch.

The modules: `rules` (field rules and limits), `schema` (the dataclasses),
`checks` (coercion and validation), `yaml_io` (the YAML reader and writer); this
one loads a file or a dict with `--set` overrides.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, utf8_problem
from .checks import _brief, _build, validate
from .rules import *  # noqa: F403  (the option names and limits, for callers)
from .rules import MAX_FILE_BYTES
from .schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    TrainingConfig,
)
from .yaml_io import YAMLRefused, _yaml_error, dump_config, parse_yaml

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
    "LoggingConfig", "ModelConfig", "TrainingConfig", "config_from_dict",
    "dump_config", "load_config", "parse_override", "parse_yaml", "validate",
]  # fmt: skip


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'training.learning_rate=3e-4' into (['training', 'learning_rate'], value).
    The value is read as YAML (text that is not YAML stays a string)."""
    if "=" not in text:
        raise ConfigError(f"--set {_brief(text)}: expected SECTION.KEY=VALUE")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {_brief(text)}: expected SECTION.KEY=VALUE")
    if why := utf8_problem(text):
        raise ConfigError(f"--set {_brief(text)}: {why}")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except YAMLRefused as exc:
        raise _yaml_error(f"--set {key}", raw, exc) from None
    except (yaml.YAMLError, ValueError):
        value = raw
    return parts, value


def _apply_override(data: dict[str, Any], text: str) -> None:
    """Set one `--set` value in `data`, walking the Config classes: every part but
    the last names a section, the last a key of it (a whole section cannot be
    replaced: that would drop the file's other keys of it silently)."""
    parts, value = parse_override(text)
    cls, node = Config, data
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        name = ".".join(parts[: i + 1])
        if part not in fields:
            raise ConfigError(
                f"--set {_brief(text)}: unknown key {_brief(name)}; valid keys: "
                f"{', '.join(fields)}"
            )
        tp = typing.get_type_hints(cls)[part]
        last = i == len(parts) - 1
        if not dataclasses.is_dataclass(tp):
            if not last:
                raise ConfigError(f"--set {_brief(text)}: {name!r} is not a section")
            node[part] = value
            return
        if last:
            first = dataclasses.fields(tp)[0].name
            raise ConfigError(
                f"--set {_brief(text)}: {name!r} is a section; set its keys one at "
                f"a time, e.g. {name}.{first}=..."
            )
        child = node.get(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"--set {_brief(text)}: section {name!r} of the config must be a "
                f"mapping of keys, got {_brief(child)}"
            )
        node[part] = node = dict(child)
        cls = tp


def _with_overrides(data: dict[str, Any] | None, overrides: list[str]) -> dict:
    """A copy of `data` with the `--set` overrides applied in order (the last of two
    for one key wins)."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {data!r}")
    data = dict(data or {})
    for text in overrides:
        _apply_override(data, text)
    return data


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] = ()) -> Config:
    """Build and validate a Config from a plain dict plus `--set` overrides."""
    return validate(_build(Config, _with_overrides(data, overrides), ""))


def _read_config_text(path: Path) -> str:
    """The text of a config file (UTF-8, at most MAX_FILE_BYTES), or ConfigError."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_FILE_BYTES} bytes: not a config file"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start})"
        ) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config file (or defaults when path is None) and apply overrides.
    The file must hold a mapping of sections; an empty one is an error (it would
    train the default model)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        text = _read_config_text(path)
        try:
            data = parse_yaml(text)
        except (yaml.YAMLError, ValueError) as exc:
            raise _yaml_error(str(path), text, exc) from None
        if data is None or data == {}:
            raise ConfigError(
                f"{path}: the config is empty; it needs at least the model and data "
                "sections (see configs/tiny.yaml)"
            )
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"{_brief(data)}"
            raise ConfigError(
                f"{path}: expected a mapping of sections (model:, data:, training: "
                f"...) at top level, got {kind}"
            )
        data.setdefault("run_name", path.stem)
    data = _with_overrides(data, overrides)  # its errors name the --set
    try:
        return validate(_build(Config, data, ""))
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None
