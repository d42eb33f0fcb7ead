"""Typed run configuration loaded from YAML, with `--set` overrides and checks.

A config file has the sections below; every key is optional and falls back to the
dataclass default. Unknown keys, wrong types and impossible shapes raise
`ConfigError` naming the key, the value and the rule, before any array exists.
This module imports neither MLX nor torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

OPTIMIZERS = ("adamw",)  # training.optimizer: the classes are in src/train/optim.py
PRECISIONS = ("auto", "fp32", "bf16")  # training.precision (src/backend/policy.py)


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 768
    n_layers: int = 16
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head)
    d_ff: int | None = None  # None: 8/3 * d_model rounded up to a multiple of 256
    context_length: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    gradient_checkpointing: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return 256 * math.ceil(8 * self.d_model / 3 / 256)

    def num_params(self) -> int:
        """Exact parameter count, computed without building the model."""
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (self.n_heads + 2 * self.kv_heads) + self.n_heads * hd * d
        mlp = 3 * d * self.ffn_dim
        norms = 2 * d + (2 * hd if self.qk_norm else 0)
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + norms) + embed + d


@dataclass
class DataConfig:
    train_path: str = "data/tinystories/train.bin"
    val_path: str = "data/tinystories/val.bin"
    tokenizer_path: str = "data/tokenizer"


@dataclass
class TrainingConfig:
    seed: int = 1337
    batch_size: int = 16  # micro-batch, sequences per forward pass
    grad_accum_steps: int = 1  # effective batch = batch_size * grad_accum_steps
    max_steps: int = 1000
    time_budget_minutes: float = 0.0  # > 0: max_steps = what fits (src/train/budget.py)
    optimizer: str = "adamw"  # one of OPTIMIZERS (src/train/optim.py)
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    label_smoothing: float = 0.0
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool = True
    streams: int = (
        0  # streams a micro-batch is split across; 0 = auto (src/backend/policy.py)
    )
    max_consecutive_skips: int = 10  # non-finite steps in a row before giving up
    spike_factor: float = 10.0  # warn when loss > factor * moving average


@dataclass
class EvalConfig:
    interval: int = 200  # steps between validations; 0 disables
    max_tokens: int = 65536  # validation tokens per evaluation
    sample_prompts: list[str] = field(default_factory=lambda: ["Once upon a time"])
    sample_tokens: int = 48
    temperature: float = 0.8


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    interval: int = 500  # steps between checkpoints; a final one is always written
    keep_last: int = 3


@dataclass
class LoggingConfig:
    dir: str = "logs"
    interval: int = 10
    progress_bar: bool = True


@dataclass
class Config:
    run_name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- type coercion


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        try:  # PyYAML reads 1e6 as a string; accept any integral number
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if math.isfinite(number) and number == int(number):
            return int(number)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        try:  # PyYAML reads 3e-4 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected a number") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise TypeError(f"unsupported config field type {tp!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f" in section '{prefix}'" if prefix else ""
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}{where}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


# ------------------------------------------------------------------- validation


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {rule}")


def validate(cfg: Config) -> Config:
    """Check every value and shape rule; raise ConfigError on the first failure."""
    m, t = cfg.model, cfg.training
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "context_length"):
        _require(getattr(m, name) > 0, f"model.{name}", getattr(m, name), "must be > 0")
    for name in ("n_kv_heads", "d_ff"):
        v = getattr(m, name)
        _require(v is None or v > 0, f"model.{name}", v, "must be > 0 (or null)")
    _require(
        m.d_model % m.n_heads == 0,
        "model.d_model",
        m.d_model,
        f"must be divisible by model.n_heads={m.n_heads}",
    )
    _require(
        m.n_heads % m.kv_heads == 0,
        "model.n_kv_heads",
        m.n_kv_heads,
        f"must divide model.n_heads={m.n_heads}",
    )
    _require(
        m.head_dim % 2 == 0,
        "model.d_model",
        m.d_model,
        f"head dim d_model/n_heads={m.head_dim} must be even for RoPE",
    )
    _require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
    _require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be > 0")
    _require(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    _require(m.init_std > 0, "model.init_std", m.init_std, "must be > 0")

    for name in ("batch_size", "grad_accum_steps", "max_steps"):
        _require(
            getattr(t, name) > 0, f"training.{name}", getattr(t, name), "must be > 0"
        )
    _require(
        t.optimizer in OPTIMIZERS,
        "training.optimizer",
        t.optimizer,
        f"must be one of {', '.join(OPTIMIZERS)}",
    )
    _require(
        t.learning_rate > 0, "training.learning_rate", t.learning_rate, "must be > 0"
    )
    _require(
        0 <= t.min_lr_ratio <= 1,
        "training.min_lr_ratio",
        t.min_lr_ratio,
        "must be in [0, 1]",
    )
    _require(
        t.warmup_steps >= 0, "training.warmup_steps", t.warmup_steps, "must be >= 0"
    )
    _require(
        t.time_budget_minutes >= 0,
        "training.time_budget_minutes",
        t.time_budget_minutes,
        "must be >= 0 (0 = off: train max_steps steps)",
    )
    _require(0 <= t.streams <= 16, "training.streams", t.streams, "must be in [0, 16]")
    _require(
        t.weight_decay >= 0, "training.weight_decay", t.weight_decay, "must be >= 0"
    )
    for name in ("beta1", "beta2"):
        v = getattr(t, name)
        _require(0 <= v < 1, f"training.{name}", v, "must be in [0, 1)")
    _require(t.eps > 0, "training.eps", t.eps, "must be > 0")
    _require(
        t.grad_clip >= 0, "training.grad_clip", t.grad_clip, "must be >= 0 (0 = off)"
    )
    _require(
        0 <= t.label_smoothing < 1,
        "training.label_smoothing",
        t.label_smoothing,
        "must be in [0, 1)",
    )
    _require(
        t.precision in PRECISIONS,
        "training.precision",
        t.precision,
        f"must be one of {', '.join(PRECISIONS)}",
    )
    _require(
        t.max_consecutive_skips > 0,
        "training.max_consecutive_skips",
        t.max_consecutive_skips,
        "must be > 0",
    )
    _require(t.spike_factor > 1, "training.spike_factor", t.spike_factor, "must be > 1")

    e = cfg.eval
    _require(e.interval >= 0, "eval.interval", e.interval, "must be >= 0 (0 = off)")
    _require(e.max_tokens > 0, "eval.max_tokens", e.max_tokens, "must be > 0")
    _require(
        e.sample_tokens >= 0, "eval.sample_tokens", e.sample_tokens, "must be >= 0"
    )
    _require(e.temperature >= 0, "eval.temperature", e.temperature, "must be >= 0")
    c = cfg.checkpoint
    _require(
        c.interval >= 0,
        "checkpoint.interval",
        c.interval,
        "must be >= 0 (0 = end only)",
    )
    _require(c.keep_last > 0, "checkpoint.keep_last", c.keep_last, "must be > 0")
    _require(
        cfg.logging.interval > 0,
        "logging.interval",
        cfg.logging.interval,
        "must be > 0",
    )
    _require(
        bool(cfg.run_name)
        and "/" not in cfg.run_name
        and cfg.run_name not in (".", ".."),
        "run_name",
        cfg.run_name,
        "must be a non-empty name without '/'",
    )
    return cfg


# ---------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split 'training.learning_rate=3e-4' into (['training', 'learning_rate'], value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected SECTION.KEY=VALUE")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: expected SECTION.KEY=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def config_from_dict(data: dict[str, Any], overrides: list[str] = ()) -> Config:
    """Build and validate a Config from a plain dict plus `--set` overrides."""
    data = dict(data or {})
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part) or {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node[part] = node = dict(child)
        node[parts[-1]] = value
    return validate(_build(Config, data, ""))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config file (or defaults when path is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at top level")
        data.setdefault("run_name", path.stem)
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what is saved with checkpoints and logs)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
