"""A Hugging Face model folder read as a model: config.json (a Llama or Qwen3)
mapped to our ModelConfig, and *.safetensors to fp32 weights under our names,
which are Hugging Face Llama's (`model.layers.0.self_attn.q_proj.weight`, ...), so
the weights need no renaming. `read_header` reads config.json alone (what a run
started from the folder takes: `src.train --init-from`). `read_model` is what `python -m src.convert --from
hf` imports and what `--checkpoint HF_FOLDER` (inference, evaluation) reads in
memory (`src.checkpoint.contents.open_hf_folder`).

Every value of config.json is checked (type and range) and every tensor (a
damaged file, NaN or inf, names and shapes against config.json), each failure
one ConvertError naming the file and the key or tensor. Cost: one read of the
weights, plus one finiteness pass over them.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from ..config import Config, ModelConfig, config_from_dict
from ..errors import ConfigError, ConvertError
from ..model.transformer import Model

# Our export stashes the full config and step in config.json under STASH; the
# ModelConfig fields and properties in ARCH define the computation (a stash whose
# ARCH differs from config.json's model is not used). The export's own names
# (src.convert.hf) are the same.
STASH = "mlx_slm_trainer"
ARCH = ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "ffn_dim")
ARCH += ("context_length", "rope_theta", "norm_eps", "qk_norm", "tie_embeddings")
ARCH += ("mlp",)
# config.json's hidden_act -> model.mlp (Llama's MLP is gated: act(gate(x)) * up(x));
# "gelu" is the exact GELU in transformers, as ours
MLP_OF_ACT = {"silu": "swiglu", "gelu": "geglu"}

# Sizes beyond these are no model we can hold: a config.json asking for them is
# damaged (the weights must match it too, so this only stops absurd requests
# before anything is allocated).
MAX_WIDTH, MAX_VOCAB, MAX_LAYERS, MAX_CONTEXT = 1 << 17, 1 << 22, 1 << 10, 1 << 22


def _int(c: dict, key: str, hi: int, default=None) -> int:
    """config.json's integer `key` in [1, hi] (`default` when absent or null)."""
    v = c.get(key)
    if v is None and default is not None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        got = f"{key}={v!r}" if key in c else f"no {key}"
        raise ConvertError(f"{got}: expected an integer in [1, {hi}]")
    return v


def _number(c: dict, key: str, default: float, lo: float, hi: float) -> float:
    """config.json's number `key` in (lo, hi] (`default` when absent or null)."""
    v = c.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo < v <= hi:
        raise ConvertError(f"{key}={v!r}: expected a number in ({lo:g}, {hi:g}]")
    return float(v)


def _flag(c: dict, key: str, default: bool) -> bool:
    """config.json's true/false `key` (`default` when absent or null)."""
    v = c.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConvertError(f"{key}={v!r}: expected true or false")
    return v


def _object(c: dict, key: str) -> dict:
    """config.json's object `key` ({} when absent or null)."""
    v = c.get(key)
    if v is not None and not isinstance(v, dict):
        raise ConvertError(f"{key}={v!r}: expected an object")
    return v or {}


def model_config_from_hf(c: dict) -> ModelConfig:
    """Our ModelConfig for a Llama/Qwen3 config.json; ConvertError naming the key
    for a missing, mistyped or absurd value, or when we cannot run that model
    exactly (biases, RoPE scaling, other activations, sliding windows).
    hidden_act silu is model.mlp swiglu, gelu (exact) geglu."""
    kind = c.get("model_type")
    if kind not in ("llama", "qwen3"):
        raise ConvertError(f"model_type {kind!r} is not supported (llama, qwen3)")
    rope, scaling = _object(c, "rope_parameters"), _object(c, "rope_scaling")
    problems = [
        f"{k}=true" for k in ("attention_bias", "mlp_bias") if _flag(c, k, False)
    ]
    act = c.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in MLP_OF_ACT:
        problems.append(f"hidden_act={act!r} (need {' or '.join(MLP_OF_ACT)})")
    for r in (rope, scaling):
        if r.get("rope_type", r.get("type", "default")) != "default":
            problems.append(f"RoPE scaling {r.get('rope_type', r.get('type'))!r}")
    if _flag(c, "use_sliding_window", False):
        problems.append("use_sliding_window=true")
    width = _int(c, "hidden_size", MAX_WIDTH)
    heads = _int(c, "num_attention_heads", width)
    if c.get("head_dim") not in (None, width // heads):
        problems.append(f"head_dim={c['head_dim']!r} != hidden_size/heads")
    if problems:
        raise ConvertError(f"cannot import this {kind} model: {'; '.join(problems)}")
    theta = _number(rope, "rope_theta", 10000.0, 0, 1e12)
    m = ModelConfig(
        vocab_size=_int(c, "vocab_size", MAX_VOCAB),
        d_model=width,
        n_layers=_int(c, "num_hidden_layers", MAX_LAYERS),
        n_heads=heads,
        n_kv_heads=_int(c, "num_key_value_heads", heads, default=heads),
        d_ff=_int(c, "intermediate_size", 16 * MAX_WIDTH),
        context_length=_int(c, "max_position_embeddings", MAX_CONTEXT, default=2048),
        rope_theta=_number(c, "rope_theta", theta, 0, 1e12),
        norm_eps=_number(c, "rms_norm_eps", 1e-6, 0, 1),
        qk_norm=kind == "qwen3",
        tie_embeddings=_flag(c, "tie_word_embeddings", False),
        mlp=MLP_OF_ACT[act],
    )
    if m.d_ff == ModelConfig(d_model=m.d_model, mlp=m.mlp).ffn_dim:
        m.d_ff = None  # the default width: keep the config as a run would write it
    return m


def read_config(folder: Path) -> dict:
    """config.json of `folder` as a dict; ConvertError naming what is wrong."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise ConvertError(f"{folder}: no such folder (a Hugging Face model folder)")
    try:
        c = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConvertError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text (bad byte at {e.start})") from None
    except ValueError as e:  # json.JSONDecodeError
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(c).__name__}")
    return c


def our_config(c: dict, path: Path, run_name: str) -> tuple[Config, int]:
    """(config, step) of the model `c` (config.json at `path`) describes: the full
    config and step we stashed at export when they still match its architecture,
    else a config of the model alone, named `run_name`, at step 0."""
    try:
        model_cfg = model_config_from_hf(c)
        cfg = config_from_dict({"run_name": run_name, "model": model_cfg.__dict__})
    except (ConvertError, ConfigError) as e:  # ConfigError: shape rules
        raise ConvertError(f"{path}: {e}") from None
    stash = c.get(STASH) or {}
    if not isinstance(stash, dict):
        raise ConvertError(f"{path}: {STASH}={stash!r}: expected an object")
    if stash.get("config") is None:
        return cfg, 0
    step = stash.get("step") or 0
    try:
        ours = config_from_dict(stash["config"])
    except ConfigError as e:
        raise ConvertError(f"{path}: {STASH}.config: {e}") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConvertError(f"{path}: {STASH}.step={step!r}: expected an integer >= 0")
    if all(getattr(ours.model, k) == getattr(model_cfg, k) for k in ARCH):
        return ours, step
    return cfg, 0


def load_weights(folder: Path, cfg: Config) -> dict[str, mx.array]:
    """The fp32 weights of `folder`'s *.safetensors, checked against `cfg`:
    ConvertError naming the file for a damaged one, a non-finite tensor, or names
    and shapes that do not match config.json."""
    files = sorted(f for f in folder.glob("*.safetensors") if f.is_file())
    if not files:
        raise ConvertError(f"{folder}: no *.safetensors weights")
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            arrays = mx.load(str(f))
        except (OSError, RuntimeError, ValueError) as e:
            raise ConvertError(f"{f}: damaged or not safetensors: {e}") from None
        for k, v in arrays.items():
            if k.endswith("rotary_emb.inv_freq"):
                continue
            if not mx.issubdtype(v.dtype, mx.floating):
                raise ConvertError(f"{f}: tensor {k} is {v.dtype}, not floating point")
            v = v.astype(mx.float32)  # fp32 master weights, as training keeps them
            if not mx.all(mx.isfinite(v)).item():
                raise ConvertError(f"{f}: tensor {k} holds NaN or inf values")
            weights[k] = v
    if cfg.model.tie_embeddings:
        weights.pop("lm_head.weight", None)
    try:  # names and shapes against our model (its random init stays lazy)
        Model(cfg.model).load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ConvertError(f"{folder}: weights do not match config.json: {e}") from None
    return weights


def read_header(folder: str | Path, run_name: str | None = None) -> tuple[Config, int]:
    """(config, step) of the Hugging Face folder `folder`, as `read_model` gives
    them, without reading the weights."""
    folder = Path(folder)
    c = read_config(folder)
    return our_config(c, folder / "config.json", run_name or folder.name)


def read_model(folder: str | Path, run_name: str | None = None):
    """(config, step, fp32 weights) of the Hugging Face folder `folder`: the
    config and step our export stashed when they still match config.json's
    model, else a config of the model alone (run_name: `run_name`, default the
    folder's name) at step 0. ConvertError naming the file for any problem."""
    cfg, step = read_header(folder, run_name)
    return cfg, step, load_weights(Path(folder), cfg)
