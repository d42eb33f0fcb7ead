"""A Hugging Face model folder read as a model: config.json (a Llama or Qwen3,
or their mixtures of experts Mixtral and Qwen3-MoE) mapped to our ModelConfig,
and *.safetensors to fp32 weights under our names, which are Hugging Face
Llama's (`model.layers.0.self_attn.q_proj.weight`, ...), so the weights need no
renaming but for the experts: one tensor per expert there, stacked here
(`stack_experts`, the inverse of `src.convert.hf.hf_weights`). `read_header` reads config.json alone (what a run
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
ARCH += ("mlp", "moe_experts", "moe_top_k")
# model_type -> (QK-norm, config.json's expert count key, its expert width key,
# the MoE block's name in the weights); mixtral's w1/w3/w2 are gate/up/down
MOE_TYPES = {
    "mixtral": (False, "num_local_experts", "intermediate_size", "block_sparse_moe"),
    "qwen3_moe": (True, "num_experts", "moe_intermediate_size", "mlp"),
}
EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
MAX_EXPERTS = 256  # model.moe_experts' bound
# config.json's hidden_act -> model.mlp (Llama's MLP is gated: act(gate(x)) * up(x));
# "gelu" is the exact GELU in transformers, as ours
MLP_OF_ACT = {"silu": "swiglu", "gelu": "geglu"}

# Sizes beyond these are no model we can hold: a config.json asking for them is
# damaged (the weights must match it too, so this only stops absurd requests
# before anything is allocated).
MAX_WIDTH, MAX_VOCAB, MAX_LAYERS, MAX_CONTEXT = 1 << 17, 1 << 22, 1 << 10, 1 << 22


def _int(c: dict, key: str, hi: int, default=None, low: int = 1) -> int:
    """config.json's integer `key` in [low, hi] (`default` when absent or null)."""
    v = c.get(key)
    if v is None and default is not None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= hi:
        got = f"{key}={v!r}" if key in c else f"no {key}"
        raise ConvertError(f"{got}: expected an integer in [{low}, {hi}]")
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


def _windows(c: dict, n_layers: int, problems: list[str]) -> tuple[int, int]:
    """(sliding_window, global_every) of a Qwen3 config.json with sliding windows:
    its layer types (given, or transformers' default from max_window_layers) must
    be our pattern, every K-th layer and the last global, for some K; else a
    problem is added."""
    w = _int(c, "sliding_window", MAX_CONTEXT)
    types = c.get("layer_types")
    if types is None:  # transformers: sliding from layer max_window_layers on
        first = _int(c, "max_window_layers", MAX_LAYERS, default=n_layers, low=0)
        types = ["sliding_attention" if i >= first else "full_attention"
                 for i in range(n_layers)]  # fmt: skip
    if not isinstance(types, list) or len(types) != n_layers:
        problems.append(f"layer_types={types!r}: expected one per layer")
        return 0, 4
    local = [t == "sliding_attention" for t in types]
    if not any(local):
        return 0, 4
    for k in range(1, n_layers + 1):
        cfg = ModelConfig(n_layers=n_layers, sliding_window=w, global_every=k)
        if [cfg.layer_window(i) is not None for i in range(n_layers)] == local:
            return w, k
    problems.append(
        f"layer_types={types!r} (we need every K-th layer and the last one global)"
    )
    return 0, 4


def model_config_from_hf(c: dict) -> ModelConfig:
    """Our ModelConfig for a Llama/Qwen3 config.json; ConvertError naming the key
    for a missing, mistyped or absurd value, or when we cannot run that model
    exactly (biases, RoPE scaling, other activations, sliding windows other than
    Qwen3's in our pattern).
    hidden_act silu is model.mlp swiglu, gelu (exact) geglu."""
    kind = c.get("model_type")
    if kind not in ("llama", "qwen3", *MOE_TYPES):
        raise ConvertError(
            f"model_type {kind!r} is not supported (llama, qwen3, mixtral, qwen3_moe)"
        )
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
    windows = (0, 4)  # (model.sliding_window, model.global_every): all global
    if _flag(c, "use_sliding_window", False):
        if kind == "qwen3":
            windows = _windows(c, _int(c, "num_hidden_layers", MAX_LAYERS), problems)
        else:
            problems.append("use_sliding_window=true")
    if kind == "mixtral" and c.get("sliding_window") is not None:
        problems.append(f"sliding_window={c['sliding_window']!r}")
    if kind == "qwen3_moe":
        if not _flag(c, "norm_topk_prob", False):  # transformers' default: false
            problems.append("norm_topk_prob=false (we renormalise the top-k weights)")
        if c.get("decoder_sparse_step", 1) != 1 or c.get("mlp_only_layers"):
            problems.append("dense layers among the experts (decoder_sparse_step, "
                            "mlp_only_layers)")  # fmt: skip
    if kind in MOE_TYPES and act != "silu":
        problems.append(f"hidden_act={act!r} for experts (need silu)")
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
        sliding_window=windows[0],
        global_every=windows[1],
    )
    if kind in MOE_TYPES:
        m.qk_norm, experts, width, _ = MOE_TYPES[kind]
        m.moe_experts = _int(c, experts, MAX_EXPERTS)
        m.moe_top_k = _int(c, "num_experts_per_tok", m.moe_experts)
        m.d_ff = _int(c, width, 16 * MAX_WIDTH)
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
    if all(getattr(ours.model, k) == getattr(model_cfg, k) for k in ARCH) and all(
        ours.model.layer_window(i) == model_cfg.layer_window(i)
        for i in range(model_cfg.n_layers)
    ):
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
    if cfg.model.moe_experts:
        weights = stack_experts(weights, cfg.model, folder)
    try:  # names and shapes against our model (its random init stays lazy)
        Model(cfg.model).load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ConvertError(f"{folder}: weights do not match config.json: {e}") from None
    return weights


def stack_experts(
    weights: dict[str, mx.array], m: ModelConfig, folder: Path
) -> dict[str, mx.array]:
    """A Mixtral / Qwen3-MoE folder's weights under our names: each layer's
    per-expert tensors stacked into `mlp.experts.X.weight` (E, out, in), the
    router `mlp.gate.weight`. ConvertError naming a missing expert tensor."""
    block = MOE_TYPES["qwen3_moe" if m.qk_norm else "mixtral"][3]
    out, experts = {}, {}
    for key, w in weights.items():
        head, sep, tail = key.partition(f".{block}.experts.")
        if not sep:
            out[key.replace(f".{block}.gate.", ".mlp.gate.")] = w
            continue
        e, _, name = tail.partition(".")  # "3", "w1.weight"
        proj = EXPERT_NAMES.get(name.split(".")[0], name.split(".")[0])
        experts.setdefault(f"{head}.mlp.experts.{proj}.weight", {})[e] = w
    for key, parts in experts.items():
        want = [str(e) for e in range(m.moe_experts)]
        if sorted(parts, key=lambda e: (len(e), e)) != want:
            raise ConvertError(
                f"{folder}: {key} needs experts 0..{m.moe_experts - 1}, "
                f"found {sorted(parts, key=lambda e: (len(e), e))}"
            )
        out[key] = mx.stack([parts[e] for e in want])
    return out


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
