"""`--from hf`: a Hugging Face Llama/Qwen3 folder (config.json, *.safetensors,
optionally our tokenizer.model) becomes a checkpoint of a new run folder.

The run folder must be new (absent or empty): an import never replaces a
checkpoint nor joins another run, and that is checked before anything is read.
Every value of config.json is checked (type and range) and every tensor (a
damaged file, NaN or inf, names and shapes against config.json), each failure
one error naming the file and the key or tensor. The run folder is built under a
temporary name beside --out and renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from ..checkpoint import store
from ..checkpoint.contents import build_meta
from ..config import Config, ModelConfig, config_from_dict
from ..errors import ConfigError, ConvertError, TokenizerError
from ..files import check_writable, write_failure
from ..model.transformer import Model
from ..tokenizer.spm import MODEL_FILE, Tokenizer
from .hf import ARCH, STASH

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
    exactly (biases, RoPE scaling, other activations, sliding windows)."""
    kind = c.get("model_type")
    if kind not in ("llama", "qwen3"):
        raise ConvertError(f"model_type {kind!r} is not supported (llama, qwen3)")
    rope, scaling = _object(c, "rope_parameters"), _object(c, "rope_scaling")
    problems = [
        f"{k}=true" for k in ("attention_bias", "mlp_bias") if _flag(c, k, False)
    ]
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c['hidden_act']!r} (need silu)")
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
    )
    if m.d_ff == ModelConfig(d_model=m.d_model).ffn_dim:
        m.d_ff = None  # the default width: keep the config as a run would write it
    return m


def _read_config(folder: Path) -> dict:
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


def _our_config(c: dict, path: Path, out: Path) -> tuple[Config, int]:
    """(config, step) of the model `c` describes: the full config and step we
    stashed at export when they still match its architecture, else a config of
    the model alone at step 0."""
    try:
        model_cfg = model_config_from_hf(c)
        cfg = config_from_dict({"run_name": out.name, "model": model_cfg.__dict__})
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


def _load_weights(folder: Path, cfg: Config) -> dict[str, mx.array]:
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


def check_new_run(out: Path) -> None:
    """ConvertError unless `out` is free for an import (absent or an empty folder):
    an import never replaces a checkpoint, nor mixes into another run."""
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ConvertError(f"--out {out} is a file; import into a new folder")
    steps = [p.name for p in store.list_checkpoints(out)]
    held = steps or sorted(p.name for p in out.iterdir())
    if held:
        what = f"checkpoint {held[-1]}" if steps else held[0]
        more = f" and {len(held) - 1} more" if len(held) > 1 else ""
        raise ConvertError(
            f"--out {out} already holds {what}{more}; an import never replaces a "
            "checkpoint nor joins another run: choose a new --out folder"
        )


def from_hf(folder, out) -> Path:
    """Import a Hugging Face folder into `<out>/step_<N>/` of a new run folder
    `out` (refused up front if it holds anything); returns the checkpoint.

    The run folder is built under a temporary name beside `out` and renamed into
    place, so a failure or Ctrl-C leaves nothing."""
    folder, out = Path(folder), Path(out)
    check_new_run(out)
    c = _read_config(folder)
    cfg, step = _our_config(c, folder / "config.json", out)
    weights = _load_weights(folder, cfg)

    check_writable(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tok_dir, sha = None, None
        if (folder / MODEL_FILE).is_file():
            try:
                sha = Tokenizer.load(folder / MODEL_FILE).sha256
                tok_dir = tmp / "tokenizer-source"
                tok_dir.mkdir()
                shutil.copyfile(folder / MODEL_FILE, tok_dir / MODEL_FILE)
            except TokenizerError as e:
                print(f"warning: not importing the tokenizer: {e}", file=sys.stderr)
        else:
            print(f"warning: {folder} has no {MODEL_FILE}", file=sys.stderr)
        meta = build_meta(cfg, sha, imported_from=str(folder.resolve()))
        run = tmp / "run"
        saved = store.save_checkpoint(run, step, weights, {}, meta, tok_dir, 0)
        check_new_run(out)  # again: nothing appeared there meanwhile
        os.rename(run, out)  # an empty folder `out` is replaced, a full one not
    except OSError as e:
        raise ConvertError(write_failure(out, e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / saved.name
