"""Hugging Face export and the names it shares with the import: `--to hf` writes
a transformers/mlx-lm model folder; `--from hf` (`src.convert.hf_import`) imports
one into a checkpoint.

Our weight names already are Hugging Face Llama's (`model.layers.0.self_attn.q_proj.
weight`, ...), so every direction is a dictionary copy plus a config translation:
`model_type` llama, or qwen3 (Llama + per-head QK-norm before RoPE) when QK-norm is
on; `model.mlp` geglu is `hidden_act` "gelu" (exact GELU, transformers computes it;
mlx-lm's llama always computes SiLU, so the export warns). The other model options
(plain MLPs, layernorm, no norm, post-norm, no RoPE, value embeddings, a logit
softcap, residual scalars) have no Llama/Qwen3 form and are refused (`--to torch`
exports them); `zero_init_residual` only sets the initial weights, so a model
trained with it is a plain Llama. A mixture of experts (`model.moe_experts`,
SwiGLU experts only) is `mixtral`, or `qwen3_moe` with QK-norm (its
norm_topk_prob routing is ours); their expert weights are written one tensor
per expert, the layout of the models on the Hub (`hf_weights`), which
transformers 5 fuses on load and mlx-lm stacks. Weights go to safetensors straight from MLX (bf16 never passes through numpy);
the tokenizer becomes a `tokenizer.json` built from our SentencePiece model, checked
to encode like it (with our chat template when the model was trained on
conversations, whose end-of-turn marker `<|end|>` then joins EOS in
`eos_token_id`, a list, so mlx-lm and transformers end a reply there);
`README.md` is a model card (`src.convert.card`). Both directions
need transformers (an mlx-lm dependency), imported only when a tokenizer is
written.

Neither direction writes over anything: `--to hf` needs a new (or empty) folder,
checked before anything is converted, built under a temporary name and renamed
into place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from ..backend.policy import DTYPES
from ..checkpoint.contents import open_checkpoint
from ..checkpoint.hf_folder import ARCH, STASH  # what --from hf reads back
from ..config import Config, ModelConfig
from ..errors import ConvertError
from ..files import check_writable, write_failure
from ..template import CHAT
from ..tokenizer.kinds import load_tokenizer, save_tokenizer, tokenizer_kind
from ..tokenizer.spm import MODEL_FILE, Tokenizer
from .card import chat_template_jinja, model_card

# model.mlp -> Llama's hidden_act (gated act(gate(x)) * up(x)); plain MLPs have none.
HIDDEN_ACT = {"swiglu": "silu", "geglu": "gelu"}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# ModelConfig fields that only matter for training: no inference format needs them.
TRAINING_ONLY = {"dropout", "init_std", "gradient_checkpointing", "zero_init_residual"}
PROBE = "Once upon a time, 12 cats  sat\ton a mat.\n<|user|>Hi! héllo 日本<|end|>"


def hf_config(cfg: Config, dtype: str, step: int | None, experts: bool = False) -> dict:
    """config.json for `cfg.model`; ConvertError if no standard type expresses it.
    `experts`: the caller writes expert weights as `hf_weights` does (an MoE
    model is refused otherwise: GGUF, which checks its models here)."""
    m = cfg.model
    # windows: Qwen3's layer_types below; MatFormer widths: the whole FFN is plain
    known = {*ARCH, "n_kv_heads", "d_ff", *TRAINING_ONLY}
    known |= {"sliding_window", "global_every", "matformer_widths"}
    default = ModelConfig()
    odd = [
        f"model.{k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in vars(m).items()
        if k not in known and v != getattr(default, k, 0)
    ]
    if m.mlp not in HIDDEN_ACT:
        odd.insert(0, f"model.mlp={m.mlp} (a plain, ungated MLP)")
    if m.sliding_window and (not m.qk_norm or m.moe_experts):
        why = "with model.moe_experts" if m.qk_norm else "without model.qk_norm"
        odd.insert(
            0,
            f"model.sliding_window={m.sliding_window} {why} (transformers' per-layer "
            "windows are Qwen3's, a dense model with QK-norm)",
        )
    if odd:
        raise ConvertError(
            f"{', '.join(odd)}: no Hugging Face Llama/Qwen3 equivalent; refusing to "
            "export a model that would compute differently (--to torch exports it)"
        )
    if m.moe_experts and not experts:
        raise ConvertError(
            f"model.moe_experts={m.moe_experts}: this format has no mixture of "
            "experts here; --to hf (as Mixtral or Qwen3-MoE) or --to torch exports it"
        )
    if m.moe_experts and m.mlp != "swiglu":
        raise ConvertError(
            f"model.mlp={m.mlp} with model.moe_experts: Mixtral's and Qwen3-MoE's "
            "experts are SwiGLU; refusing to export a model that would compute "
            "differently (--to torch exports it)"
        )
    kind = ("qwen3" if m.qk_norm else "llama", "qwen3_moe" if m.qk_norm else "mixtral")
    out = {
        "architectures": [ARCHITECTURES[kind[bool(m.moe_experts)]]],
        "model_type": kind[bool(m.moe_experts)],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": HIDDEN_ACT[m.mlp],
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
    if m.sliding_window:  # Qwen3 (QK-norm, checked above): a type per layer
        types = [
            "full_attention" if m.layer_window(i) is None else "sliding_attention"
            for i in range(m.n_layers)
        ]
        out.update(
            use_sliding_window=True,
            sliding_window=m.sliding_window,
            max_window_layers=m.n_layers,
            layer_types=types,
        )
    elif m.qk_norm:
        out.update(use_sliding_window=False, sliding_window=None)
    if m.moe_experts:
        out.update(_moe_config(cfg))
    return out


def _moe_config(cfg: Config) -> dict:
    """config.json's expert keys: every layer routed, top-k weights renormalised
    (Mixtral always does; Qwen3-MoE with norm_topk_prob), no router noise."""
    m = cfg.model
    out = {
        "num_experts_per_tok": m.moe_top_k,
        "router_aux_loss_coef": cfg.training.moe_aux_loss,
        "output_router_logits": False,
    }
    if m.qk_norm:  # qwen3_moe
        return out | {
            "num_experts": m.moe_experts,
            "moe_intermediate_size": m.ffn_dim,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    return out | {
        "num_local_experts": m.moe_experts,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }


def hf_weights(weights: dict[str, mx.array], m: ModelConfig) -> dict[str, mx.array]:
    """Our weights under the Hugging Face names of `m`'s model type: the same
    dictionary for a dense model; an MoE model's stacked experts split, expert e
    of `mlp.experts.X.weight` (E, out, in) being [e]:

    | ours (layer i) | qwen3_moe | mixtral |
    |---|---|---|
    | mlp.gate.weight | mlp.gate.weight | block_sparse_moe.gate.weight |
    | mlp.experts.gate_proj.weight[e] | mlp.experts.{e}.gate_proj.weight | block_sparse_moe.experts.{e}.w1.weight |
    | mlp.experts.up_proj.weight[e] | mlp.experts.{e}.up_proj.weight | block_sparse_moe.experts.{e}.w3.weight |
    | mlp.experts.down_proj.weight[e] | mlp.experts.{e}.down_proj.weight | block_sparse_moe.experts.{e}.w2.weight |
    """  # noqa: E501
    if not m.moe_experts:
        return dict(weights)
    block = "mlp" if m.qk_norm else "block_sparse_moe"
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    out = {}
    for key, w in weights.items():
        head, sep, tail = key.partition(".mlp.experts.")
        if sep:  # tail: "gate_proj.weight"
            proj = tail.split(".")[0]
            name = f"{proj}.weight" if m.qk_norm else f"{names[proj]}.weight"
            for e in range(m.moe_experts):
                out[f"{head}.{block}.experts.{e}.{name}"] = w[e]
        else:
            out[key.replace(".mlp.gate.", f".{block}.gate.")] = w
    return out


def end_of_turn_id(tok: Tokenizer) -> int:
    """The id of the marker that ends a chat reply (`src.template.CHAT`): a chat
    model's export lists it among its EOS ids (config.json and
    generation_config.json), so mlx-lm and transformers stop a reply there."""
    (marker,) = CHAT.stop_markers
    ids = tok.encode(marker)
    if len(ids) != 1:
        raise ConvertError(f"{tok.dir}: {marker} is not a single token")
    return ids[0]


def write_hf_tokenizer(
    tok: Tokenizer, out: Path, context_length: int, chat: bool = False
) -> None:
    """tokenizer.json + tokenizer_config.json (a LlamaTokenizer: BPE with byte
    fallback, no prefix space; with our chat template when `chat`), plus our
    tokenizer.model for `--from hf`."""
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
    if chat:  # trained on conversations: apply_chat_template renders ours
        hf.chat_template = chat_template_jinja()
    hf.save_pretrained(str(out))
    shutil.copyfile(spm_file, out / MODEL_FILE)


def to_hf(path, out, dtype: str = "fp32") -> Path:
    """Write a Hugging Face model folder `out`: new, or an empty folder (checked
    before anything is converted); built beside it and renamed into place."""
    out = Path(out)
    if os.path.lexists(out) and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(
            f"{out} exists and is not an empty folder; an export never writes over "
            "files: choose a new --out folder"
        )
    ck = open_checkpoint(path)
    cfg, weights, src = ck.config, ck.weights, ck.path
    config = hf_config(cfg, dtype, ck.meta.get("step"), experts=True)
    if cfg.model.sliding_window:
        print(
            f"warning: model.sliding_window={cfg.model.sliding_window} exports as "
            "Qwen3 layer_types, which transformers computes; mlx-lm's qwen3 ignores "
            "them (it attends to the whole context in every layer, the same only "
            "up to the window): load this folder with transformers or this project",
            file=sys.stderr,
        )
    if cfg.model.mlp != "swiglu":
        print(
            f"warning: model.mlp={cfg.model.mlp} exports as hidden_act="
            f"{config['hidden_act']!r}, which transformers computes; mlx-lm's llama "
            "ignores hidden_act (it computes SiLU): load this folder with "
            "transformers or this project",
            file=sys.stderr,
        )
    tok = None
    if tokenizer_kind(ck.tokenizer_dir):
        tok = load_tokenizer(ck.tokenizer_dir)
        if tok.kind == "huggingface":  # its own special tokens, not ours
            config.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
            config.update(pad_token_id=tok.pad_id)
        elif ck.meta.get("chat_template"):  # replies end with <|end|>: stop there
            config["eos_token_id"] = [config["eos_token_id"], end_of_turn_id(tok)]
    check_writable(out.parent)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp = work / "hf"  # made by mkdir: the usual permissions, not mkdtemp's 0700
    try:
        tmp.mkdir()
        named = hf_weights(weights, cfg.model)
        arrays = {k: v.astype(DTYPES[dtype]) for k, v in sorted(named.items())}
        try:
            mx.save_safetensors(
                str(tmp / "model.safetensors"), arrays, {"format": "pt"}
            )
        except RuntimeError as e:  # MLX reports write failures (disk full) this way
            raise OSError(errno.EIO, str(e)) from e
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        generation = json.dumps({k: config[k] for k in ids}, indent=2)
        (tmp / "generation_config.json").write_text(generation + "\n")
        if tok is not None and tok.kind == "huggingface":
            save_tokenizer(tok, tmp)  # tokenizer.json as it came
        elif tok is not None:
            chat = bool(ck.meta.get("chat_template"))
            write_hf_tokenizer(tok, tmp, cfg.model.context_length, chat)
        else:
            print(
                f"warning: {src} has no tokenizer/; wrote weights only", file=sys.stderr
            )
        (tmp / "README.md").write_text(model_card(ck, str(out), dtype, config))
        os.rename(tmp, out)  # an empty folder `out` is replaced, a full one not
    except OSError as e:
        raise ConvertError(write_failure(out, e)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
