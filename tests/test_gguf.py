"""`--to gguf`: the file read back with gguf's own GGUFReader must hold exactly our
weights (under llama.cpp's names, q/k rows reordered for the llama arch and put
back here by an independent inverse), the hyperparameters of the config and our
tokenizer's vocabulary; a numpy transcription of llama.cpp's llama and qwen3
graphs, reading nothing but the file, computes our logits from it; what llama.cpp
cannot compute is refused through the real command. With llama-cpp-python
installed (it builds from source), an opt-in slow test runs the file in llama.cpp
itself and compares its logits and tokens with ours.
"""

import errno
import math
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_convert import make_checkpoint, mlx_logits

from src.backend.policy import DTYPES
from src.checkpoint import store as ckpt
from src.checkpoint.contents import load_model
from src.config import config_from_dict
from src.convert import cli as convert
from src.convert import gguf as gguf_export
from src.errors import ConvertError
from src.template import render_conversation

gguf = pytest.importorskip(
    "gguf", reason="gguf not installed: pip install -e '.[gguf]'"
)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # llama: tied, GQA, vocab padded past the tokenizer; qwen3: chat
    "llama": dict(qk_norm=False, tie_embeddings=True, n_kv_heads=2, vocab_size=520),
    "qwen3": dict(qk_norm=True, tie_embeddings=False, n_kv_heads=1, vocab_size=512),
}
CHAT = {"llama": False, "qwen3": True}
ROPE_THETA = 5000.0


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def source(request, tiny_dataset, tiny_corpus, tiny_config, tmp_path_factory):
    """(variant, checkpoint path, MLX model, tokenizer, 64 tokens of real text)."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = tiny_config(d_model=64, context_length=64, rope_theta=ROPE_THETA,
                      init_std=0.15, **VARIANTS[request.param])  # fmt: skip
    chat = CHAT[request.param]
    path = make_checkpoint(
        tmp / "run", tiny_dataset["tokenizer"], cfg, chat_template=chat
    )
    model, tok, _ = load_model(path)
    ids = tok.encode(tiny_corpus.read_text()[:2000])[:64]
    return request.param, path, model, tok, ids


def export(path, out, dtype="fp32") -> Path:
    args = ["--checkpoint", path, "--to", "gguf", "--out", out, "--dtype", dtype]
    assert convert.main([str(a) for a in args]) == 0
    return out


def run_cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "src.convert", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def field(reader, key):
    return reader.fields[key].contents()


# llama.cpp's tensor names, written out here rather than taken from gguf's table
PARTS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip
TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llama_cpp_name(key: str) -> str:
    if key in TOP:
        return TOP[key]
    layer, part = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key).groups()
    return f"blk.{layer}.{PARTS[part]}.weight"


def undo_interleave(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, even rows then odd rows: the inverse of the export's reorder."""
    hd = rows.shape[0] // n_heads
    heads = [rows[h * hd : (h + 1) * hd] for h in range(n_heads)]
    return np.concatenate([np.concatenate([x[0::2], x[1::2]]) for x in heads])


def as_float32(t) -> np.ndarray:
    """A GGUFReader tensor's values as float32 (BF16 comes back as raw bytes)."""
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        bits = t.data.view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return t.data.astype(np.float32)


# --------------------------------------------------------------------- weights


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_tensors_equal_our_weights(source, tmp_path, dtype):
    variant, path, model, _, _ = source
    cfg = model.config
    weights, _, _ = ckpt.load_checkpoint(path)
    reader = gguf.GGUFReader(export(path, tmp_path / "m.gguf", dtype))
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(llama_cpp_name(k) for k in weights)
    assert ("output.weight" in tensors) == (not cfg.tie_embeddings)  # absent: tied
    raw = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}[dtype]
    for key, ours in weights.items():
        t = tensors[llama_cpp_name(key)]
        assert list(t.shape) == list(reversed(ours.shape)), key  # ggml: fastest first
        assert t.tensor_type.name == ("F32" if ours.ndim == 1 else raw), key
        want = ours if ours.ndim == 1 else ours.astype(DTYPES[dtype])
        want = np.array(want.astype(mx.float32))
        got = as_float32(t).reshape(want.shape)
        if variant == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            n = cfg.n_heads if "q_proj" in key else cfg.kv_heads
            assert not np.array_equal(got, want), f"{key} was not reordered"
            got = undo_interleave(got, n)
        assert np.array_equal(got, want), key  # exact: same rounding as MLX's


def _rope(x, theta, pairs):
    """RoPE over the last axis of x (positions on axis 0) with the given pairing:
    "halves" rotates (i, i + d/2) as we and llama.cpp's qwen3 (NEOX) do,
    "adjacent" (2i, 2i + 1) as its llama (NORM) does; both use the frequency
    theta^(-2i/d) for pair i."""
    L, d = x.shape[0], x.shape[-1]
    ang = np.arange(L) * theta ** (-np.arange(0, d, 2) / d)[:, None]  # (d/2, L)
    ang = ang.T.reshape(L, *[1] * (x.ndim - 2), d // 2)
    cos, sin = np.cos(ang), np.sin(ang)
    if pairs == "halves":
        a, b = x[..., : d // 2], x[..., d // 2 :]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    ra, rb = a * cos - b * sin, b * cos + a * sin
    if pairs == "halves":
        return np.concatenate([ra, rb], axis=-1)
    return np.stack([ra, rb], axis=-1).reshape(x.shape)


def test_reordered_rows_under_adjacent_rope_give_our_attention_scores():
    """Why the llama arch gets reordered q/k rows: scores q.k with llama.cpp's
    adjacent-pair RoPE on the reordered rows equal ours on the original ones (and
    without the reorder they do not)."""
    rng = np.random.default_rng(0)
    hd, d, L = 16, 32, 12
    wq, wk, x = (
        rng.normal(size=(hd, d)),
        rng.normal(size=(hd, d)),
        rng.normal(size=(L, d)),
    )
    ours = _rope(x @ wq.T, 1e4, "halves") @ _rope(x @ wk.T, 1e4, "halves").T
    pq = np.array(gguf_export.interleave_rope_rows(mx.array(wq), 1))
    pk = np.array(gguf_export.interleave_rope_rows(mx.array(wk), 1))
    theirs = _rope(x @ pq.T, 1e4, "adjacent") @ _rope(x @ pk.T, 1e4, "adjacent").T
    assert np.allclose(ours, theirs, atol=1e-9)
    plain = _rope(x @ wq.T, 1e4, "adjacent") @ _rope(x @ wk.T, 1e4, "adjacent").T
    assert not np.allclose(ours, plain, atol=1e-3)  # the check can fail


def gguf_forward(path: Path, ids: list[int]) -> np.ndarray:
    """Logits (float64) of a GGUF file computed the way llama.cpp's llama and
    qwen3 graphs do, from nothing but the file: its hyperparameter keys, its
    tensors by llama.cpp's names, NORM RoPE for llama and NEOX for qwen3, and
    token_embd as the output when output.weight is absent."""
    reader = gguf.GGUFReader(path)
    arch = field(reader, "general.architecture")

    def key(k):
        return field(reader, f"{arch}.{k}")

    T = {t.name: as_float32(t).astype(np.float64).reshape(tuple(reversed(t.shape)))
         for t in reader.tensors}  # fmt: skip
    n_head, n_kv = key("attention.head_count"), key("attention.head_count_kv")
    eps, base = key("attention.layer_norm_rms_epsilon"), key("rope.freq_base")
    hd = key("rope.dimension_count")
    pairs = {"llama": "adjacent", "qwen3": "halves"}[arch]

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    L = len(ids)
    x = T["token_embd.weight"][ids]
    causal = np.triu(np.full((L, L), -np.inf), 1)
    for i in range(key("block_count")):
        W = {n.split(".")[2]: w for n, w in T.items() if n.startswith(f"blk.{i}.")}
        h = rms(x, W["attn_norm"])
        q = (h @ W["attn_q"].T).reshape(L, n_head, hd)
        k = (h @ W["attn_k"].T).reshape(L, n_kv, hd)
        v = (h @ W["attn_v"].T).reshape(L, n_kv, hd)
        if arch == "qwen3":
            q, k = rms(q, W["attn_q_norm"]), rms(k, W["attn_k_norm"])
        q, k = _rope(q, base, pairs), _rope(k, base, pairs)
        kv = np.arange(n_head) // (n_head // n_kv)  # the kv head of each q head
        s = np.einsum("qhd,khd->hqk", q, k[:, kv]) / np.sqrt(hd) + causal
        p = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v[:, kv])
        x = x + o.reshape(L, -1) @ W["attn_output"].T
        h = rms(x, W["ffn_norm"])
        g = h @ W["ffn_gate"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ W["ffn_up"].T)) @ W["ffn_down"].T
    out = T.get("output.weight", T["token_embd.weight"])
    return rms(x, T["output_norm.weight"]) @ out.T


def test_file_computes_our_logits_the_llama_cpp_way(source, tmp_path):
    """End to end without llama.cpp: the f32 file, run by a numpy transcription of
    llama.cpp's graphs, gives our logits (max |diff| printed); the same file with
    the llama q/k reorder skipped does not."""
    variant, path, model, _, ids = source
    ours = mlx_logits(model, ids)[0]
    theirs = gguf_forward(export(path, tmp_path / "m.gguf"), ids)
    diff = np.abs(ours - theirs)
    print(f"{variant}: MLX vs GGUF (llama.cpp math) max |diff| {diff.max():.3g}, "
          f"mean {diff.mean():.3g}")  # fmt: skip
    assert diff.max() <= 1e-4, diff.max()
    if variant == "llama":
        with pytest.MonkeyPatch.context() as m:
            m.setattr(gguf_export, "interleave_rope_rows", lambda w, n: w)
            plain = gguf_forward(export(path, tmp_path / "plain.gguf"), ids)
        assert np.abs(ours - plain).max() > 1e-2


# ------------------------------------------------------------- metadata, vocab


def test_metadata_keys_equal_the_config(source, tmp_path):
    variant, path, model, tok, _ = source
    m = model.config
    reader = gguf.GGUFReader(export(path, tmp_path / "m.gguf", "fp16"))
    assert field(reader, "general.architecture") == variant
    assert field(reader, "general.file_type") == 1  # MOSTLY_F16
    want = {
        "context_length": m.context_length,
        "embedding_length": m.d_model,
        "block_count": m.n_layers,
        "feed_forward_length": m.ffn_dim,
        "attention.head_count": m.n_heads,
        "attention.head_count_kv": m.kv_heads,
        "attention.key_length": m.d_model // m.n_heads,
        "attention.value_length": m.d_model // m.n_heads,
        "rope.dimension_count": m.d_model // m.n_heads,
        "vocab_size": m.vocab_size,
    }
    for key, value in want.items():
        assert field(reader, f"{variant}.{key}") == value, key
    assert field(reader, f"{variant}.rope.freq_base") == ROPE_THETA
    eps = field(reader, f"{variant}.attention.layer_norm_rms_epsilon")
    assert math.isclose(eps, m.norm_eps, rel_tol=1e-6)  # stored as float32
    assert field(reader, "tokenizer.ggml.model") == "llama"
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unknown": tok.unk_id,
           "padding": tok.pad_id}  # fmt: skip
    for name, value in ids.items():
        assert field(reader, f"tokenizer.ggml.{name}_token_id") == value, name
    # our training data and inference put no BOS, and no space before the text
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.ggml.add_eos_token") is False
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False


def test_vocab_equals_our_tokenizer(source, tmp_path):
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    _, path, model, tok, _ = source
    reader = gguf.GGUFReader(export(path, tmp_path / "m.gguf"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    n = tok.vocab_size
    assert len(tokens) == len(scores) == len(types) == model.config.vocab_size
    assert tokens[:n] == [tok.id_to_piece(i) for i in range(n)]
    proto = pb.ModelProto()  # the tokenizer file itself, read independently
    proto.ParseFromString((path / "tokenizer" / "tokenizer.model").read_bytes())
    assert [float(s) for s in scores[:n]] == [p.score for p in proto.pieces]
    assert list(types[:n]) == [p.type for p in proto.pieces]  # same numbering
    kinds = {int(t) for t in types[:n]}
    assert {1, 2, 3, 4, 6} <= kinds  # normal, unknown, control, user-defined, byte
    assert types[tokens.index("<0x0A>")] == 6 and types[tokens.index("<|user|>")] == 4
    assert all(t == 5 for t in types[n:])  # padding rows: unused
    assert len(set(tokens)) == len(tokens)


def test_chat_template_only_when_trained_with_it(source, tmp_path):
    import jinja2

    variant, path, _, tok, _ = source
    reader = gguf.GGUFReader(export(path, tmp_path / "m.gguf"))
    if not CHAT[variant]:
        assert "tokenizer.chat_template" not in reader.fields
        return
    template = field(reader, "tokenizer.chat_template")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "A story?"},
    ]
    rendered = jinja2.Template(template).render(messages=messages)
    assert rendered == render_conversation(messages)
    end = field(reader, "tokenizer.ggml.eot_token_id")
    assert tok.id_to_piece(end) == "<|end|>"


# ------------------------------------------------------------------ refusals


def test_cli_errors_exit_2_and_write_nothing(source, tmp_path, tiny_corpus,
                                              tiny_config):  # fmt: skip
    """Through the real command: an existing --out (kept byte for byte), a
    unigram tokenizer (llama.cpp would split text differently), a checkpoint
    without a tokenizer, a missing checkpoint."""
    path = source[1]
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"mine")
    uni = tmp_path / "uni"
    proc = subprocess.run(
        [sys.executable, "-m", "src.tokenizer", "train", "--input", tiny_corpus,
         "--output", uni, "--vocab-size", "400", "--model-type", "unigram"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cfg = tiny_config(vocab_size=400, d_model=32)
    uni_ck = make_checkpoint(tmp_path / "uni_run", uni, cfg)
    bare_ck = make_checkpoint(tmp_path / "bare_run", None, cfg)
    cases = [
        (path, taken, "already exists"),
        (uni_ck, tmp_path / "u.gguf", "tokenizer model_type 'unigram'"),
        (bare_ck, tmp_path / "b.gguf", "has no tokenizer/tokenizer.model"),
        (tmp_path / "nope", tmp_path / "n.gguf", "no such checkpoint"),
    ]
    for ck, out, words in cases:
        proc = run_cli("--checkpoint", ck, "--to", "gguf", "--out", out)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (words, proc.stderr)
        assert err[-1].startswith("error: ") and words in err[-1], (words, err)
        assert "Traceback" not in proc.stderr
        assert out == taken or not out.exists()
    assert taken.read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf") == [
        "taken.gguf"
    ]  # no temp file left either


def test_refuses_a_setting_llama_cpp_cannot_compute(source, monkeypatch):
    from src.checkpoint.contents import open_checkpoint

    ck = open_checkpoint(source[1])
    cfg = config_from_dict(ckpt.read_meta(source[1])["config"])
    cfg.model.parallel_blocks = True  # a future option neither arch expresses
    monkeypatch.setattr(ck, "config", cfg)
    with pytest.raises(ConvertError, match="parallel_blocks"):
        gguf_export.check_exportable(ck)


@pytest.mark.parametrize(
    "key, value", [("sliding_window", 8), ("moe_experts", 4)], ids=["local", "moe"]
)
def test_refuses_local_attention_and_experts(source, monkeypatch, key, value):
    from src.checkpoint.contents import open_checkpoint

    ck = open_checkpoint(source[1])
    cfg = config_from_dict(ckpt.read_meta(source[1])["config"])
    setattr(cfg.model, key, value)
    monkeypatch.setattr(ck, "config", cfg)
    with pytest.raises(ConvertError, match=f"model.{key}={value}: .*llama.cpp"):
        gguf_export.check_exportable(ck)


def test_without_gguf_installed_names_the_extra(source, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails
    out = tmp_path / "m.gguf"
    args = ["--checkpoint", source[1], "--to", "gguf", "--out", out]
    assert convert.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[gguf]'" in err and not out.exists()


def test_a_failed_write_leaves_nothing(source, tmp_path, monkeypatch, capsys):
    def disk_full(self, **_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    args = ["--checkpoint", source[1], "--to", "gguf", "--out", tmp_path / "m.gguf"]
    assert convert.main([str(a) for a in args]) == 2
    assert "disk full" in capsys.readouterr().err.lower()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------- llama.cpp itself (opt-in)


@pytest.mark.slow
def test_llama_cpp_logits_match_ours(source, tmp_path):
    """llama.cpp (llama-cpp-python) runs the f32 file: same tokens for a text,
    and logits within 1e-3 of ours on 64 tokens (max |diff| printed)."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python not installed (builds from source)"
    )
    variant, path, model, tok, ids = source
    out = export(path, tmp_path / "m.gguf", "fp32")
    llm = llama_cpp.Llama(
        model_path=str(out), n_ctx=64, n_batch=64, logits_all=True, verbose=False
    )
    # special=True: llama.cpp makes "<|end|>" a control token (its end of turn, by
    # name) and parses control tokens in text only then; ours always parses it
    text = "Once upon a time, 12 cats  sat\ton a mat.\n<|user|>Hi! héllo 日本<|end|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    ours = mlx_logits(model, ids)[0][:, : theirs.shape[1]]
    diff = np.abs(ours - theirs)
    print(f"{variant}: MLX vs llama.cpp max |diff| {diff.max():.3g}, "
          f"mean {diff.mean():.3g}")  # fmt: skip
    assert diff.max() <= 1e-3, diff.max()
    assert int(np.argmax(theirs[-1])) == int(np.argmax(ours[-1]))
