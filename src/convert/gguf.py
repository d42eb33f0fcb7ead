"""GGUF export for llama.cpp and Ollama: `python -m src.convert --checkpoint DIR
--to gguf --out model.gguf [--dtype fp32|fp16|bf16]`, written with the `gguf`
package's GGUFWriter (`pip install -e '.[gguf]'`, imported lazily).

The architecture is the one `--to hf` maps to: `llama`, or `qwen3` when QK-norm
is on; llama.cpp computes both with SwiGLU only, so every other `model.mlp` is
refused, as are the options `--to hf` refuses. Tensor names come from gguf's own table (`get_tensor_name_map`), so
`model.layers.0.self_attn.q_proj.weight` becomes `blk.0.attn_q.weight`. The two
archs rotate differently in llama.cpp: qwen3 rotates the two halves of each head
(NeoX style, as we do), llama rotates consecutive pairs, so for llama the rows of
q_proj and k_proj are reordered within each head (row i of the first half goes to
2i, row i of the second half to 2i + 1); q.k is unchanged by a permutation of the
head dimensions applied to both, so attention is the same. Tied embeddings are
written as token_embd alone (llama.cpp reuses it when output.weight is absent).
Norm weights stay float32 (llama.cpp expects it); matrices get `--dtype`, cast in
MLX (bf16 is written as its raw 16 bits, never rounded by numpy).

The tokenizer is our SentencePiece BPE: `tokenizer.ggml.model = "llama"` with
every piece, its score (merge order) and type (normal, control, byte, unknown;
the chat markers are user-defined, so llama.cpp parses them in text as we do),
no space prefix and no BOS (like our training data and our inference), and the
chat template when the model was trained on conversations. A unigram tokenizer
is refused: llama.cpp's "llama" tokenizer merges by score like BPE.

The file is new: an existing --out is refused, and it is written under a
temporary name and hard-linked into place (`atomic_file(replace=False)`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import sentencepiece as spm

from ..checkpoint.contents import TOKENIZER_DIR, Checkpoint, open_checkpoint
from ..errors import ConvertError
from ..files import atomic_file, check_writable, write_failure
from ..tokenizer.spm import CHAT_MARKERS, MODEL_FILE, Tokenizer, read_info
from .card import chat_template_jinja, training_facts
from .hf import hf_config

# gguf's TokenType values (sentencepiece's piece types use the same numbers)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)
FILE_TYPES = {"fp32": 0, "fp16": 1, "bf16": 32}  # gguf.LlamaFileType: ALL_F32...


def gguf_arch(qk_norm: bool) -> str:
    return "qwen3" if qk_norm else "llama"


def interleave_rope_rows(w: mx.array, n_heads: int) -> mx.array:
    """q_proj/k_proj rows from our half-split RoPE layout to the consecutive pairs
    llama.cpp's llama arch rotates: per head, (h0, h1) -> (h0[0], h1[0], h0[1],
    h1[1], ...)."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def tokenizer_type(tok_dir: Path) -> str | None:
    """'bpe' or 'unigram' from the sidecar `src.tokenizer` writes (None: unknown)."""
    info = read_info(tok_dir)
    return info.get("model_type") if info else None


def vocab(tok: Tokenizer, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, gguf token types) of `tok`, padded to the model's
    `n_vocab` rows with unused pieces the tokenizer never produces."""
    sp = spm.SentencePieceProcessor(model_file=str(tok.dir / MODEL_FILE))
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        kind = NORMAL
        if sp.is_unknown(i):
            kind = UNKNOWN
        elif sp.is_control(i):
            kind = CONTROL
        elif sp.is_byte(i):
            kind = BYTE
        elif sp.is_unused(i):
            kind = UNUSED
        elif piece in CHAT_MARKERS:  # our only user-defined symbols
            kind = USER_DEFINED
        pieces.append(piece)
        scores.append(sp.get_score(i))
        types.append(kind)
    for i in range(len(pieces), n_vocab):
        pieces.append(f"[PAD{i}]")
        scores.append(-1e9)
        types.append(UNUSED)
    return pieces, scores, types


def check_exportable(ck: Checkpoint) -> Tokenizer:
    """ConvertError naming what llama.cpp cannot compute; the tokenizer if not."""
    cfg = ck.config
    if cfg.model.mlp != "swiglu":
        other = "--to hf or --to torch" if cfg.model.gated else "--to torch"
        raise ConvertError(
            f"model.mlp={cfg.model.mlp}: llama.cpp's llama and qwen3 architectures "
            "compute SwiGLU only; refusing to export a model that would compute "
            f"differently ({other} exports it)"
        )
    m = cfg.model
    for key, value in [
        ("sliding_window", m.sliding_window),
        ("moe_experts", m.moe_experts),
    ]:
        if value:
            raise ConvertError(
                f"model.{key}={value}: this exporter writes llama.cpp's dense llama "
                "and qwen3 architectures only; refusing to export a model that would "
                "compute differently (--to hf or --to torch exports it)"
            )
    hf_config(cfg, "fp32", None)  # settings no Llama/Qwen3 expresses are refused
    tok_dir = ck.tokenizer_dir
    if not (tok_dir / MODEL_FILE).is_file():
        raise ConvertError(
            f"{ck.path} has no {TOKENIZER_DIR}/{MODEL_FILE}: a GGUF file carries its "
            "tokenizer and llama.cpp cannot run without one"
        )
    kind = tokenizer_type(tok_dir)
    if kind not in (None, "bpe"):
        raise ConvertError(
            f"tokenizer model_type {kind!r} ({tok_dir}): llama.cpp's SentencePiece "
            "tokenizer merges pieces like BPE and would split text differently; "
            "only a bpe tokenizer (src.tokenizer train --model-type bpe) exports "
            "to GGUF"
        )
    tok = Tokenizer.load_spm(tok_dir)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConvertError(
            f"the tokenizer has {tok.vocab_size} pieces but model.vocab_size is "
            f"{cfg.model.vocab_size}"
        )
    return tok


def tensors(ck: Checkpoint, dtype: str):
    """(gguf name, numpy array, gguf raw type or None) of every weight."""
    import gguf

    m = ck.config.model
    arch = gguf_arch(m.qk_norm)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], m.n_layers)
    for key, w in sorted(ck.weights.items()):
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None:
            raise ConvertError(f"weight {key} has no GGUF {arch} name")
        if arch == "llama" and key.endswith("self_attn.q_proj.weight"):
            w = interleave_rope_rows(w, m.n_heads)
        elif arch == "llama" and key.endswith("self_attn.k_proj.weight"):
            w = interleave_rope_rows(w, m.kv_heads)
        if w.ndim == 1 or dtype == "fp32":
            yield name, np.array(w.astype(mx.float32)), None
        elif dtype == "fp16":
            yield name, np.array(w.astype(mx.float16)), None
        else:  # numpy has no bf16: its raw bits, rounded by MLX
            bits = np.array(w.astype(mx.bfloat16).view(mx.uint16))
            yield name, bits, gguf.GGMLQuantizationType.BF16


def build_writer(ck: Checkpoint, tok: Tokenizer, dtype: str):
    """A GGUFWriter holding the metadata and tensors of `ck` (nothing written)."""
    import gguf

    cfg, m = ck.config, ck.config.model
    facts = training_facts(ck)
    w = gguf.GGUFWriter(None, gguf_arch(m.qk_norm))
    w.add_name(cfg.run_name)
    at = f" at step {facts.step}" if facts.step is not None else ""
    w.add_description(f"trained with mlx-slm-trainer{at}")
    w.add_file_type(FILE_TYPES[dtype])
    w.add_context_length(m.context_length)
    w.add_embedding_length(m.d_model)
    w.add_block_count(m.n_layers)
    w.add_feed_forward_length(m.ffn_dim)
    w.add_head_count(m.n_heads)
    w.add_head_count_kv(m.kv_heads)
    w.add_key_length(m.head_dim)
    w.add_value_length(m.head_dim)
    w.add_rope_dimension_count(m.head_dim)
    w.add_rope_freq_base(m.rope_theta)
    w.add_layer_norm_rms_eps(m.norm_eps)
    w.add_vocab_size(m.vocab_size)

    pieces, scores, types = vocab(tok, m.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.unk_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(False)  # our token files and inference have no BOS
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)  # trained with add_dummy_prefix=False
    if facts.chat:
        w.add_chat_template(chat_template_jinja())
        w.add_eot_token_id(pieces.index("<|end|>"))

    for name, array, raw in tensors(ck, dtype):
        w.add_tensor(name, array, raw_dtype=raw)
    return w


def to_gguf(path, out, dtype: str = "fp32") -> Path:
    """Write the new GGUF file `out` for llama.cpp / Ollama; ConvertError if it
    exists, cannot be written, or holds what llama.cpp cannot compute."""
    out = Path(out)
    if os.path.lexists(out):
        raise ConvertError(
            f"{out} already exists; an export never replaces a file: choose another "
            "--out (or move that one away)"
        )
    import gguf  # noqa: F401  (ImportError here: the cli names the extra)

    ck = open_checkpoint(path)
    tok = check_exportable(ck)
    check_writable(out.parent)
    print(f"converting {ck.path} to GGUF ({dtype})...", file=sys.stderr)
    writer = build_writer(ck, tok, dtype)
    try:
        with atomic_file(out, replace=False) as f:
            writer.open_output_file(Path(f.name))  # the temp file, opened again
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except FileExistsError:
        raise ConvertError(f"{out} appeared while exporting; it was kept") from None
    except OSError as e:
        raise ConvertError(write_failure(out, e)) from None
    finally:
        writer.close()
    return out
