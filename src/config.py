"""Typed run configuration loaded from YAML, with `--set` overrides and checks.

A config file is a mapping of the sections below; a key left out falls back to the
dataclass default, but the file may not be empty and a section must be a mapping.
Every field carries its rule (`num`, `choice`, `choices`, `_folder_name`): each
number must be finite and in its range, each string valid UTF-8 without NUL,
before any array exists; unknown keys, wrong types and impossible shapes raise
`ConfigError` naming the key, the value and the rule. The YAML reader refuses what
a config never needs and a hostile file abuses: aliases (an alias bomb), repeated
keys, non-string keys. This module imports neither MLX nor torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, utf8_problem

OPTIMIZERS = (
    "adamw",
    "muon",
)  # training.optimizer: the classes are in src/train/optim.py
PRECISIONS = ("auto", "fp32", "bf16")  # training.precision (src/backend/policy.py)
REPORTERS = ("tensorboard", "wandb")  # logging.report_to (src/train/reporters.py)
LOSS_ON = ("auto", "all", "assistant")
SCHEDULES = ("cosine", "wsd")  # training.schedule (src/train/schedule.py)
KERNEL_SETS = ("auto", "portable", "fused")  # training.kernels (src/backend/kernels.py)

MAX_COUNT = 2**31 - 1  # steps, sizes and intervals reach MLX as int32 arrays
MAX_SEED = 2**63 - 1  # mx.random.seed and numpy take it (src/train/step.py)
MAX_VOCAB = 2**20  # 4x the largest vocabularies in use (src/tokenizer/spm.py)
MAX_FILE_BYTES = 1 << 20  # a config is a few hundred bytes; /dev/zero is not one
MAX_DEPTH = 16  # YAML nesting; a config needs 3 (section, key, list)


def _show(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def num(default, *, ge=None, gt=None, le=None, lt=None, off=None):
    """A numeric field with its rule: finite, >= ge (or > gt) and <= le (or < lt);
    `off` is one more value allowed outside that (e.g. 0 = greedy). Every number of
    the config is declared this way, so none escapes the range check."""
    lo, hi = (ge if gt is None else gt), (le if lt is None else lt)
    if lo is None or hi is None:
        raise TypeError("a config number needs a lower and an upper bound")
    left, right = ("(" if gt is not None else "["), (")" if lt is not None else "]")
    rule = f"in {left}{_show(lo)}, {_show(hi)}{right}"
    rule = rule if off is None else f"{_show(off)} or {rule}"

    def check(v: float) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return "must be a finite number"
        ok = (v > lo if gt is not None else v >= lo) and (
            v < hi if lt is not None else v <= hi
        )
        return None if ok or v == off else f"must be {rule}"

    return field(default=default, metadata={"check": check})


def choice(default: str, options: tuple[str, ...]):
    """A string field that must be one of `options`."""

    def check(v: str) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}"

    return field(default=default, metadata={"check": check})


def choices(options: tuple[str, ...]):
    """A list field (default empty) of distinct strings, each one of `options`;
    a single string is a list of one."""

    def check(v: list[str]) -> str | None:
        for i, item in enumerate(v):
            if item not in options:
                return f"{item!r} is not one of {', '.join(options)}"
            if item in v[:i]:
                return f"{item!r} is listed twice"
        return None

    return field(default_factory=list, metadata={"check": check})


def _folder_name(v: str) -> str | None:
    """run_name becomes a folder under checkpoint.dir and logging.dir."""
    seps = {"/", "\\", os.sep, os.altsep} - {None}
    if v in (".", "..") or any(s in v for s in seps) or len(v.encode()) > 200:
        return "must be a folder name: no '/' or '\\', not '.' or '..', <= 200 bytes"
    if any(ord(c) < 32 or c == "\x7f" for c in v):
        return "must not hold control characters (a newline, a tab...)"
    return None


# model.mlp: gated (act(gate(x)) * up(x)) or plain (act(up(x))) feed-forward; GELU is
# the exact (erf) one. model.norm / norm_position / position: src/model/transformer.py
GATED_MLPS = ("swiglu", "geglu")
MLPS = (*GATED_MLPS, "silu", "gelu", "relu2")
NORMS = ("rmsnorm", "layernorm", "none")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("rope", "none")
MATFORMER_LOSSES = ("sample", "sum")  # training.matformer_loss (src/model/matformer.py)


def _fractions(v: list[float]) -> str | None:
    """model.matformer_widths: increasing fractions in (0, 1] ending with 1.0."""
    if not v:
        return None
    if any(not math.isfinite(f) or not 0 < f <= 1 for f in v):
        return "every width must be a fraction in (0, 1]"
    if any(b <= a for a, b in zip(v, v[1:])) or v[-1] != 1.0:
        return (
            "must be increasing and end with 1.0 (the whole FFN), e.g. [0.25, 0.5, 1.0]"
        )
    return None


@dataclass
class ModelConfig:
    vocab_size: int = num(32000, ge=1, le=MAX_VOCAB)
    d_model: int = num(768, ge=1, le=2**16)
    n_layers: int = num(16, ge=1, le=1024)
    n_heads: int = num(12, ge=1, le=1024)
    # None: same as n_heads (plain multi-head)
    n_kv_heads: int | None = num(None, ge=1, le=1024)
    # None: gated MLPs 8/3 * d_model rounded up to a multiple of 256, plain ones
    # 4 * d_model (about the same parameter count)
    d_ff: int | None = num(None, ge=1, le=2**20)
    context_length: int = num(2048, ge=1, le=2**20)
    rope_theta: float = num(10000.0, gt=1, le=1e12)
    norm_eps: float = num(1e-5, ge=1e-12, le=1)
    qk_norm: bool = False
    tie_embeddings: bool = True
    dropout: float = num(0.0, ge=0, lt=1)
    init_std: float = num(0.02, gt=0, le=1)
    gradient_checkpointing: bool = False
    # feed-forward: swiglu, geglu (gated), silu, gelu, relu2 (plain; relu2 = ReLU^2)
    mlp: str = choice("swiglu", MLPS)
    # the norm of each block and the final one; pre: x + f(norm(x)), post:
    # norm(x + f(x)) with no final norm; none: no norm layers (QK-norm stays)
    norm: str = choice("rmsnorm", NORMS)
    norm_position: str = choice("pre", NORM_POSITIONS)
    position: str = choice("rope", POSITIONS)  # none: no positional encoding (NoPE)
    # > 0: local layers attend to the last `sliding_window` positions only (their
    # own included); every global_every-th layer and the last one attend to all
    sliding_window: int = num(0, ge=1, le=2**20, off=0)
    global_every: int = num(4, ge=1, le=1024)  # 1: every layer global
    # > 0: each FFN is `moe_experts` experts (each of the width above), top-k routed
    moe_experts: int = num(0, ge=2, le=256, off=0)
    moe_top_k: int = num(2, ge=1, le=256)
    # MatFormer: the FFN's first f * ffn_dim neurons form a usable smaller FFN for
    # each fraction f listed (training covers them all); [] = off
    matformer_widths: list[float] = field(
        default_factory=list, metadata={"check": _fractions}
    )
    # the 2025-26 small-model recipe (src/model/transformer.py): value embeddings
    # (v += ve(tokens) in the last layer and every second one before it), residual
    # output projections initialised at zero, logits c * tanh(logits / c) (0: off),
    # and per-layer learned scalars h = a * h + b * x0 before each block
    value_embeddings: bool = False
    zero_init_residual: bool = False
    logit_softcap: float = num(0.0, ge=1e-3, le=1e6, off=0)
    residual_scalars: bool = False

    @property
    def gated(self) -> bool:
        return self.mlp in GATED_MLPS

    @property
    def final_norm(self) -> bool:
        """Whether the backbone ends with a norm (pre-norm blocks only)."""
        return self.norm != "none" and self.norm_position == "pre"

    def layer_window(self, i: int) -> int | None:
        """Layer i's attention window (None: global attention)."""
        if not self.sliding_window:
            return None
        last = i == self.n_layers - 1
        return None if last or (i + 1) % self.global_every == 0 else self.sliding_window

    def value_embedding(self, i: int) -> bool:
        """Whether layer i has a value embedding (the last and every second one
        before it)."""
        return self.value_embeddings and (self.n_layers - 1 - i) % 2 == 0

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
        if not self.gated:  # two matrices instead of three: 4d keeps their size
            return 4 * self.d_model
        return 256 * math.ceil(8 * self.d_model / 3 / 256)

    def num_params(self) -> int:
        """Exact parameter count, computed without building the model."""
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (self.n_heads + 2 * self.kv_heads) + self.n_heads * hd * d
        mlp = (3 if self.gated else 2) * d * self.ffn_dim
        if self.moe_experts:  # the experts and the router
            mlp = self.moe_experts * mlp + d * self.moe_experts
        norms = (2 * d if self.norm != "none" else 0) + (2 * hd if self.qk_norm else 0)
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        final = d if self.final_norm else 0
        ve = self.vocab_size * self.kv_heads * hd  # a table per value-embedding layer
        extra = sum(map(self.value_embedding, range(self.n_layers))) * ve
        extra += 2 * self.n_layers if self.residual_scalars else 0
        return self.n_layers * (attn + mlp + norms) + embed + final + extra


@dataclass
class DataConfig:
    train_path: str = "data/tinystories/train.bin"
    val_path: str = "data/tinystories/val.bin"
    tokenizer_path: str = "data/tokenizer"


@dataclass
class TrainingConfig:
    seed: int = num(1337, ge=0, le=MAX_SEED)
    batch_size: int = num(16, ge=1, le=2**20)  # micro-batch, sequences per forward
    # effective batch = batch_size * grad_accum_steps
    grad_accum_steps: int = num(1, ge=1, le=2**20)
    max_steps: int = num(1000, ge=1, le=MAX_COUNT)
    # > 0: max_steps = what fits (src/train/budget.py); 1e5 minutes is ~70 days
    time_budget_minutes: float = num(0.0, ge=0, le=1e5)
    optimizer: str = choice("adamw", OPTIMIZERS)  # src/train/optim.py
    # muon: the block matrices' optimizer (the rest keeps AdamW at learning_rate)
    muon_learning_rate: float = num(0.02, gt=0, le=10)
    muon_momentum: float = num(0.95, ge=0, lt=1)
    muon_weight_decay: float = num(0.0, ge=0, le=1)
    # mixture of experts: weight of the load-balancing loss added to the loss
    moe_aux_loss: float = num(0.01, ge=0, le=100)
    # MatFormer: one width per step (sample) or every width's loss summed (sum)
    matformer_loss: str = choice("sample", MATFORMER_LOSSES)
    learning_rate: float = num(3e-4, gt=0, le=1)
    # after the warm-up: cosine decay, or warmup-stable-decay (src/train/schedule.py)
    schedule: str = choice("cosine", SCHEDULES)
    # both decay to learning_rate * min_lr_ratio
    min_lr_ratio: float = num(0.1, ge=0, le=1)
    warmup_steps: int = num(100, ge=0, le=MAX_COUNT)
    # wsd: the share of max_steps at the end that decays linearly (0: no decay)
    decay_fraction: float = num(0.2, ge=0, le=1)
    # <= 1: AdamW multiplies weights by 1 - lr * weight_decay, which stays >= 0
    weight_decay: float = num(0.1, ge=0, le=1)
    decay_embeddings: bool = False
    beta1: float = num(0.9, ge=0, lt=1)
    beta2: float = num(0.95, ge=0, lt=1)
    eps: float = num(1e-8, ge=1e-30, le=1)  # float32 keeps it (not 0)
    grad_clip: float = num(1.0, ge=0, le=1e6)  # global-norm clip; 0 disables
    label_smoothing: float = num(0.0, ge=0, lt=1)
    precision: str = choice("auto", PRECISIONS)  # src/backend/policy.py
    compile: bool = True
    # streams a micro-batch is split across; 0 = auto (src/backend/policy.py)
    streams: int = num(0, ge=0, le=16)
    # the CPU backend's kernels: auto = measured at start (src/train/autotune.py)
    kernels: str = choice("auto", KERNEL_SETS)
    autotune: bool = True  # auto settings above: measured (cached), not assumed
    # a new run from these weights (our checkpoint or a Hugging Face folder): step 0,
    # fresh optimizer and schedule, the source's architecture and tokenizer
    init_from: str | None = None
    # the tokens the loss counts: all, or the assistant's replies of chat data
    # (prepare --chat); auto = assistant for chat data, else all
    loss_on: str = choice("auto", LOSS_ON)
    # non-finite steps in a row before giving up
    max_consecutive_skips: int = num(10, ge=1, le=MAX_COUNT)
    # warn when loss > factor * moving average
    spike_factor: float = num(10.0, gt=1, le=1e6)


@dataclass
class EvalConfig:
    interval: int = num(200, ge=0, le=MAX_COUNT)  # steps between validations; 0: off
    max_tokens: int = num(65536, ge=1, le=MAX_COUNT)  # validation tokens per eval
    sample_prompts: list[str] = field(default_factory=lambda: ["Once upon a time"])
    sample_tokens: int = num(48, ge=0, le=2**20)
    # 0 = greedy; a tiny one would overflow the logits / temperature
    temperature: float = num(0.8, ge=1e-3, le=100, off=0)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    # steps between checkpoints; a final one is always written
    interval: int = num(500, ge=0, le=MAX_COUNT)
    keep_last: int = num(3, ge=1, le=MAX_COUNT)


@dataclass
class LoggingConfig:
    dir: str = "logs"
    interval: int = num(10, ge=1, le=MAX_COUNT)
    progress_bar: bool = True
    # experiment trackers that get the metrics.jsonl rows too: [tensorboard, wandb]
    report_to: list[str] = choices(REPORTERS)
    wandb_project: str = "mlx-slm"  # wandb.init(project=...)


@dataclass
class Config:
    run_name: str = field(default="run", metadata={"check": _folder_name})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- type coercion


def _brief(value: Any) -> str:
    """repr(value), cut short: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


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
        raise ConfigError(f"{key}={_brief(value)}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        number = _float(value)  # PyYAML reads 1e6 as a string: any integral number
        if number is not None and math.isfinite(number) and number == int(number):
            return int(number)
        raise ConfigError(f"{key}={_brief(value)}: expected an integer")
    if tp is float:
        number = _float(value)
        if number is None:
            raise ConfigError(f"{key}={_brief(value)}: expected a number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={_brief(value)}: expected a string")
    raise TypeError(f"unsupported config field type {tp!r}")


def _float(value: Any) -> float | None:
    """`value` as a float (PyYAML reads 3e-4, without a dot, as a string), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):  # OverflowError: an int past 1e308
        return None


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        what = f"section '{prefix}'" if prefix else "the config"
        raise ConfigError(
            f"{what} must be a mapping of keys, got {_brief(data)}"
            + (" (write it as {} or leave it out)" if data is None else "")
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    where = f" in section '{prefix}'" if prefix else ""
    if bad := [k for k in data if not isinstance(k, str)]:
        raise ConfigError(f"key {_brief(bad[0])}{where} is not a string")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(_brief(k) for k in unknown)}{where}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


# ------------------------------------------------------------------- validation


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={_brief(value)}: {rule}")


def _text_problem(text: str) -> str | None:
    """What makes a config string unusable (as a path, a name or a prompt)."""
    if not text:
        return "must not be empty"
    if "\0" in text:
        return "must not hold a NUL character"
    return utf8_problem(text)


def _check_fields(obj: Any, prefix: str = "") -> None:
    """Apply every field's own rule (its `check`), and the text rules to every
    string; a number without a rule is a bug of this module."""
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{key}.")
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if isinstance(item, str) and (why := _text_problem(item)):
                where = key if i is None else f"{key}[{i}]"
                raise ConfigError(f"{where}={_brief(item)}: {why}")
        check = f.metadata.get("check")
        if check is None and isinstance(value, (int, float)):
            if not isinstance(value, bool):
                raise TypeError(
                    f"config field {key} has no rule: declare it with num()"
                )
        if check is not None and value is not None:
            rule = check(value)
            _require(rule is None, key, value, rule)


def validate(cfg: Config) -> Config:
    """Check every field's rule, then the rules between fields (shapes); raise
    ConfigError on the first failure."""
    _check_fields(cfg)
    m = cfg.model
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
        m.head_dim % 2 == 0 or m.position != "rope",
        "model.d_model",
        m.d_model,
        f"head dim d_model/n_heads={m.head_dim} must be even for RoPE",
    )
    _require(
        m.norm != "none" or m.norm_position == "pre",
        "model.norm_position",
        m.norm_position,
        "has no effect with model.norm=none (leave it at pre)",
    )
    _require(
        m.sliding_window < m.context_length,
        "model.sliding_window",
        m.sliding_window,
        f"must be below model.context_length={m.context_length} (a window that "
        "covers the context is global attention: use 0)",
    )
    _require(
        not m.moe_experts or m.moe_top_k <= m.moe_experts,
        "model.moe_top_k",
        m.moe_top_k,
        f"must be at most model.moe_experts={m.moe_experts}",
    )
    _require(
        not (m.moe_experts and m.matformer_widths),
        "model.matformer_widths",
        m.matformer_widths,
        "cannot be combined with model.moe_experts (choose one)",
    )
    for f in m.matformer_widths:
        _require(
            round(f * m.ffn_dim) >= 1,
            "model.matformer_widths",
            m.matformer_widths,
            f"{f:g} of ffn_dim={m.ffn_dim} is no neuron",
        )
    return cfg


# ------------------------------------------------------------------------ YAML


class YAMLRefused(yaml.MarkedYAMLError):
    """YAML that is valid but has no place in a config (see `_Loader`)."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what a config never needs and a hostile file
    abuses: aliases (a few hundred bytes of nested aliases expand to gigabytes),
    a key repeated in a mapping (PyYAML keeps the last one silently), keys that
    are not strings, and deep nesting (the composer recurses)."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise YAMLRefused(
                problem=f"alias *{event.anchor}: aliases are not allowed in a config",
                problem_mark=event.start_mark,
            )
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YAMLRefused(
                problem=f"nested more than {MAX_DEPTH} levels deep",
                problem_mark=event.start_mark,
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict[str, int] = {}
            for key_node, _ in node.value:
                line = key_node.start_mark.line + 1
                if key_node.tag != "tag:yaml.org,2002:str":
                    kind = key_node.tag.rpartition(":")[2]  # int, bool, null, seq...
                    shown = key_node.value if kind not in ("seq", "map") else "[...]"
                    raise YAMLRefused(
                        problem=f"the key {shown} is not a string (YAML reads it as {kind}; "
                        "quote it)",
                        problem_mark=key_node.start_mark,
                    )
                if key_node.value in seen:
                    raise YAMLRefused(
                        problem=f"the key {key_node.value!r} appears twice, on lines "
                        f"{seen[key_node.value]} and {line}",
                        problem_mark=key_node.start_mark,
                    )
                seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """The value of a YAML document, read by `_Loader`; yaml.YAMLError if invalid."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_error(where: str, text: str, exc: Exception) -> ConfigError:
    """One line, `where:line:col: invalid YAML: problem`, from a PyYAML error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML forbids
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        problem = f"{exc.reason}: #x{exc.character:04x}"
    elif isinstance(exc, yaml.MarkedYAMLError):
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problem = "; ".join(filter(None, (exc.context, exc.problem)))
    else:  # e.g. ValueError: an integer of more than 4300 digits
        line, column, problem = 0, 0, str(exc)
    at = f"{where}:{line}:{column}" if line else where
    return ConfigError(f"{at}: invalid YAML: {' '.join(problem.split())}")


# ---------------------------------------------------------------------- loading


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


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:
        return True  # a saved config must load again, and `_Loader` refuses aliases


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what is saved with checkpoints and logs)."""
    return yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False)
