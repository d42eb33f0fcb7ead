"""Hugging Face export and import: `--to hf` writes a transformers/mlx-lm model
folder, `--from hf` imports one into a checkpoint.

Our weight names already are Hugging Face Llama's (`model.layers.0.self_attn.q_proj.
weight`, ...), so every direction is a dictionary copy plus a config translation:
`model_type` llama, or qwen3 (Llama + per-head QK-norm before RoPE) when QK-norm is
on. Weights go to safetensors straight from MLX (bf16 never passes through numpy);
the tokenizer becomes a `tokenizer.json` built from our SentencePiece model, checked
to encode like it. Both directions need transformers (an mlx-lm dependency),
imported only when a tokenizer is written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from ..backend.policy import DTYPES
from ..checkpoint import store
from ..checkpoint.contents import build_meta, open_checkpoint
from ..config import Config, ModelConfig, config_from_dict
from ..errors import ConvertError, TokenizerError
from ..files import check_writable
from ..model.transformer import Model
from ..tokenizer.spm import MODEL_FILE, Tokenizer

HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
STASH = "mlx_slm_trainer"  # config.json key holding our full config and step
# ModelConfig fields that only matter for training: no inference format needs them.
TRAINING_ONLY = {"dropout", "init_std", "gradient_checkpointing"}
# What defines the computation (ModelConfig fields and properties).
ARCH = ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "ffn_dim")
ARCH += ("context_length", "rope_theta", "norm_eps", "qk_norm", "tie_embeddings")
PROBE = "Once upon a time, 12 cats  sat\ton a mat.\n<|user|>Hi! héllo 日本<|end|>"


def hf_config(cfg: Config, dtype: str, step: int | None) -> dict:
    """config.json for `cfg.model`; ConvertError if no standard type expresses it."""
    m = cfg.model
    known = {*ARCH, "n_kv_heads", "d_ff", *TRAINING_ONLY}
    default = ModelConfig()
    odd = [
        k for k, v in vars(m).items() if k not in known and v != getattr(default, k, 0)
    ]
    if odd:
        raise ConvertError(
            f"model settings {', '.join(odd)} have no Hugging Face Llama/Qwen3 "
            "equivalent; refusing to export a model that would compute differently"
        )
    out = {
        "architectures": ["Qwen3ForCausalLM" if m.qk_norm else "LlamaForCausalLM"],
        "model_type": "qwen3" if m.qk_norm else "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.context_length,
        "rms_norm_eps": m.norm_eps,
        # rope_theta top-level for mlx-lm and transformers 4; nested for 5.
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": Tokenizer.bos_id,
        "eos_token_id": Tokenizer.eos_id,
        "pad_token_id": Tokenizer.pad_id,
        "dtype": HF_DTYPE_NAMES[dtype],
        STASH: {"config": cfg.to_dict(), "step": step},
    }
    if m.qk_norm:
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def write_hf_tokenizer(tok: Tokenizer, out: Path, context_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (a LlamaTokenizer: BPE with byte
    fallback, no prefix space), plus our tokenizer.model for `--from hf`."""
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    spm_file = tok.dir / MODEL_FILE
    parts = SentencePieceExtractor(str(spm_file)).extract(BPE)
    hf = LlamaTokenizer(
        vocab=parts["vocab"],
        merges=parts["merges"],
        additional_special_tokens=parts["additional_special_tokens"],
        add_prefix_space=False,  # we train with add_dummy_prefix=False
        legacy=False,
        pad_token="<pad>",
        model_max_length=context_length,
    )
    if hf.encode(PROBE, add_special_tokens=False) != tok.encode(PROBE):
        raise ConvertError(
            f"the Hugging Face tokenizer built from {spm_file} does not encode like "
            "the original; this transformers version is not supported for export"
        )
    hf.save_pretrained(str(out))
    shutil.copyfile(spm_file, out / MODEL_FILE)


def to_hf(path, out, dtype: str = "fp32") -> Path:
    """Write a Hugging Face model folder; refuses an existing non-empty `out`."""
    ck = open_checkpoint(path)
    cfg, weights, src = ck.config, ck.weights, ck.path
    config = hf_config(cfg, dtype, ck.meta.get("step"))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} exists and is not an empty folder")
    check_writable(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        arrays = {k: v.astype(DTYPES[dtype]) for k, v in sorted(weights.items())}
        mx.save_safetensors(str(tmp / "model.safetensors"), arrays, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        generation = json.dumps({k: config[k] for k in ids}, indent=2)
        (tmp / "generation_config.json").write_text(generation + "\n")
        if (src / "tokenizer" / MODEL_FILE).is_file():
            tok = Tokenizer.load(src / "tokenizer")
            write_hf_tokenizer(tok, tmp, cfg.model.context_length)
        else:
            print(
                f"warning: {src} has no tokenizer/; wrote weights only", file=sys.stderr
            )
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_config_from_hf(c: dict) -> ModelConfig:
    """Our ModelConfig for a Llama/Qwen3 config.json; ConvertError if we cannot run
    that model exactly (biases, RoPE scaling, other activations, sliding windows)."""
    kind = c.get("model_type")
    if kind not in ("llama", "qwen3"):
        raise ConvertError(f"model_type {kind!r} is not supported (llama, qwen3)")
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    problems = [f"{k}=true" for k in ("attention_bias", "mlp_bias") if c.get(k)]
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={c['hidden_act']!r} (need silu)")
    for r in (rope, scaling):
        if r.get("rope_type", r.get("type", "default")) != "default":
            problems.append(f"RoPE scaling {r.get('rope_type', r.get('type'))!r}")
    if c.get("use_sliding_window"):
        problems.append("use_sliding_window=true")
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        problems.append(f"head_dim={c['head_dim']} != hidden_size/heads")
    if problems:
        raise ConvertError(f"cannot import this {kind} model: {'; '.join(problems)}")
    m = ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads,
        d_ff=c["intermediate_size"],
        context_length=c.get("max_position_embeddings") or 2048,
        rope_theta=float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        qk_norm=kind == "qwen3",
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )
    if m.d_ff == ModelConfig(d_model=m.d_model).ffn_dim:
        m.d_ff = None  # the default width: keep the config as a run would write it
    return m


def from_hf(folder, out) -> Path:
    """Import a Hugging Face folder into `<out>/step_<N>/`; returns that path."""
    folder = Path(folder)
    try:
        c = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{folder}: no readable config.json ({e})") from None
    try:
        model_cfg = model_config_from_hf(c)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConvertError):
            raise
        raise ConvertError(f"{folder}/config.json: missing or bad key {e}") from None
    stash, step = c.get(STASH) or {}, 0
    cfg = config_from_dict({"run_name": Path(out).name, "model": model_cfg.__dict__})
    if stash.get("config"):
        ours = config_from_dict(stash["config"])
        if all(getattr(ours.model, k) == getattr(model_cfg, k) for k in ARCH):
            cfg, step = ours, int(stash.get("step") or 0)

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{folder}: no *.safetensors weights")
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except (OSError, RuntimeError, ValueError) as e:
            raise ConvertError(f"{f}: cannot load: {e}") from None
    weights = {
        k: v.astype(mx.float32)  # fp32 master weights, as training keeps them
        for k, v in weights.items()
        if not k.endswith("rotary_emb.inv_freq")
    }
    if cfg.model.tie_embeddings:
        weights.pop("lm_head.weight", None)
    try:  # names and shapes against our model (its random init stays lazy)
        Model(cfg.model).load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ConvertError(f"{folder}: weights do not match config.json: {e}") from None

    tok_dir, sha = None, None
    with tempfile.TemporaryDirectory() as tmp:
        if (folder / MODEL_FILE).is_file():
            try:
                sha = Tokenizer.load(folder / MODEL_FILE).sha256
                tok_dir = Path(tmp)
                shutil.copyfile(folder / MODEL_FILE, tok_dir / MODEL_FILE)
            except TokenizerError as e:
                print(f"warning: not importing the tokenizer: {e}", file=sys.stderr)
        else:
            print(f"warning: {folder} has no {MODEL_FILE}", file=sys.stderr)
        meta = build_meta(cfg, sha, imported_from=str(folder.resolve()))
        return store.save_checkpoint(out, step, weights, {}, meta, tok_dir, 0)
