"""Typing and checking a config: plain YAML values coerced to each field's type
(`_build`), then every field's rule and the rules between fields (`validate`).
Errors are `ConfigError`s naming the key, the value and the rule."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from ..errors import ConfigError, utf8_problem
from .schema import Config


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
