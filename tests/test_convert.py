"""Conversion to PyTorch / Hugging Face and back, with parity against three other
implementations: our PyTorch reference, transformers' own classes, and mlx-lm.

Random-weight models use a large init and perturbed norm weights, so the logits are
far from uniform and a greedy decode actually depends on every piece of the math.
Tests that need torch (and transformers' model classes) skip with the reason shown
when it is not installed; everything else runs without torch.
"""

import json
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from src.backend.policy import DTYPES
from src.checkpoint import store as ckpt
from src.checkpoint.contents import build_meta, load_model
from src.config import config_from_dict
from src.convert import cli as convert
from src.convert import hf
from src.errors import ConvertError
from src.inference.generate import generate_tokens
from src.model.transformer import Model
from src.template import render_conversation
from src.tokenizer.spm import Tokenizer

try:
    import torch

    from src.convert import torch_model
except ImportError:  # the optional `torch` extra
    torch = None
try:
    import transformers
except ImportError:
    transformers = None

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # fp32 logits, max absolute difference
needs_torch = pytest.mark.skipif(
    torch is None, reason="torch not installed: pip install -e '.[torch]'"
)
needs_transformers = pytest.mark.skipif(
    torch is None or transformers is None,
    reason="torch and transformers not installed: pip install -e '.[torch]'",
)
VARIANTS = {  # plain Llama (tied, GQA) and the QK-norm one that exports as qwen3
    "llama": {"qk_norm": False, "tie_embeddings": True, "n_kv_heads": 2},
    "qwen3": {"qk_norm": True, "tie_embeddings": False, "n_kv_heads": 1},
}


def make_checkpoint(run_dir: Path, tokenizer_dir: Path | None, cfg, **meta) -> Path:
    """A verified checkpoint of model config `cfg` with random, non-trivial weights,
    `meta` added to its meta.json (tokenizer_dir None: a checkpoint without one)."""
    mx.random.seed(0)
    weights = dict(tree_flatten(Model(cfg.model).parameters()))
    for k, v in weights.items():
        if v.ndim == 1:  # norm weights: not all ones, so misuse of them shows
            weights[k] = 1 + 0.3 * mx.random.normal(v.shape)
    sha = Tokenizer.load(tokenizer_dir).sha256 if tokenizer_dir else None
    meta = build_meta(cfg, sha, **meta)
    return ckpt.save_checkpoint(run_dir, 7, weights, {}, meta, tokenizer_dir)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def source(request, tiny_dataset, tiny_corpus, tiny_config, tmp_path_factory):
    """(checkpoint path, MLX model, tokenizer, 64 tokens of real text)."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = tiny_config(vocab_size=512, d_model=64, context_length=64, rope_theta=5000.0,
                      init_std=0.15, **VARIANTS[request.param])  # fmt: skip
    path = make_checkpoint(tmp / "run", tiny_dataset["tokenizer"], cfg)
    model, tok, _ = load_model(path)
    ids = tok.encode(tiny_corpus.read_text()[:2000])[:64]
    return path, model, tok, ids


def mlx_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))


def assert_close(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    diff = np.abs(ours - theirs)
    msg = f"{what}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g} (tol {TOL})"
    print(msg)  # the measured numbers, visible with pytest -s
    assert diff.max() <= TOL, msg


def mlx_greedy(model, ids, n=32) -> list[int]:
    out = list(generate_tokens(model, ids[:8], n))
    assert len(set(out)) > 4, f"degenerate decode {out}: the comparison proves little"
    return out


def convert_(*args) -> int:
    """`python -m src.convert ARGS` in this process; returns the exit code."""
    return convert.main([str(a) for a in args])


def run_cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "src.convert", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


# ------------------------------------------------- the PyTorch reference model


@needs_torch
def test_torch_reference_matches_mlx(source, tmp_path):
    path, model, _, ids = source
    pt = tmp_path / "m.pt"
    assert convert_("--checkpoint", path, "--to", "torch", "--out", pt) == 0
    ref = torch_model.load(pt)  # strict=True inside
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).numpy()
    assert_close(mlx_logits(model, ids), theirs, "MLX vs torch reference")
    # cached MLX decoding vs cache-free torch decoding, 32 greedy tokens
    assert mlx_greedy(model, ids) == torch_model.generate_greedy(ref, ids[:8], 32)


def _interleaved_rope(x, cos, sin):
    """The *other* RoPE convention (rotate consecutive pairs): a classic port bug."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.flatten(-2)


@needs_torch
def test_parity_check_catches_a_wrong_reference(source, tmp_path, monkeypatch):
    """The comparison above must be able to fail: a wrong RoPE convention and a
    transposed (square) matrix each break it."""
    path, model, _, ids = source
    pt = tmp_path / "m.pt"
    assert convert_("--checkpoint", path, "--to", "torch", "--out", pt) == 0
    ours = mlx_logits(model, ids)
    ref = torch_model.load(pt)
    with monkeypatch.context() as m:
        m.setattr(torch_model, "apply_rope", _interleaved_rope)
        with torch.no_grad(), pytest.raises(AssertionError):
            assert_close(ours, ref(torch.tensor([ids])).numpy(), "wrong RoPE")
    q = ref.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        q.copy_(q.T.clone())
        with pytest.raises(AssertionError):
            assert_close(ours, ref(torch.tensor([ids])).numpy(), "transposed q_proj")
    assert mlx_greedy(model, ids) != torch_model.generate_greedy(ref, ids[:8], 32)


# ------------------------------------------------------------ Hugging Face folder


@needs_transformers
def test_transformers_loads_export_with_parity(source, tmp_path, tiny_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tok, ids = source
    out = tmp_path / "hf"
    assert convert_("--checkpoint", path, "--to", "hf", "--out", out) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.model_type == ("qwen3" if model.config.qk_norm else "llama")
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
        hf.generation_config.eos_token_id = None  # decode 32 tokens, as MLX does
        prompt = torch.tensor([ids[:8]])
        decoded = hf.generate(prompt, max_new_tokens=32, do_sample=False)
    decoded = decoded[0, 8:].tolist()
    assert_close(
        mlx_logits(model, ids), theirs, f"MLX vs transformers {type(hf).__name__}"
    )
    assert mlx_greedy(model, ids) == decoded
    hf_tok = AutoTokenizer.from_pretrained(out)
    for line in tiny_corpus.read_text().splitlines()[:300] + [
        "  a\tb 1234 é 日本 <|user|>"
    ]:
        ids_ = tok.encode(line)
        assert hf_tok.encode(line, add_special_tokens=False) == ids_, line
        assert hf_tok.decode(ids_) == line


def test_mlx_lm_loads_and_generates(source, tmp_path):
    import mlx_lm

    path, model, _, ids = source
    out = tmp_path / "hf"
    assert convert_("--checkpoint", path, "--to", "hf", "--out", out) == 0
    lm, lm_tok = mlx_lm.load(str(out))
    assert_close(mlx_logits(model, ids), mlx_logits(lm, ids), "MLX vs mlx-lm")
    text = mlx_lm.generate(lm, lm_tok, prompt="Once upon a time", max_tokens=8)
    assert isinstance(text, str) and text


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_round_trip_mlx_hf_mlx_is_bitwise(source, tmp_path, dtype):
    path, model, tok, _ = source
    out = tmp_path / "hf"
    args = ("--checkpoint", path, "--to", "hf", "--out", out, "--dtype", dtype)
    assert convert_(*args) == 0
    assert convert_("--from", "hf", out, "--out", tmp_path / "back") == 0
    back = ckpt.resolve_resume(str(tmp_path / "back/latest"), tmp_path / "back")
    ckpt.verify_checkpoint(back)
    original, _, meta = ckpt.load_checkpoint(path)
    exported = mx.load(str(out / "model.safetensors"))
    imported, _, new_meta = ckpt.load_checkpoint(back)
    assert sorted(original) == sorted(exported) == sorted(imported)
    want = DTYPES[dtype]
    for k, v in original.items():
        assert exported[k].dtype == want, k
        assert mx.array_equal(exported[k], v.astype(want)).item(), k  # exact rounding
        expected = v if dtype == "fp32" else v.astype(want).astype(mx.float32)
        assert imported[k].dtype == mx.float32, k
        assert mx.array_equal(imported[k], expected).item(), k
    assert new_meta["config"] == meta["config"] and new_meta["step"] == meta["step"]
    assert new_meta["tokenizer_sha256"] == tok.sha256
    load_model(back)  # a normal checkpoint for inference


# ------------------------------------------- a real run of configs/tiny.yaml


@pytest.fixture(scope="module")
def trained(train_tiny, tmp_path_factory) -> Path:
    """The latest checkpoint of a 20-step run of configs/tiny.yaml (real CLI)."""
    ck, _ = train_tiny(
        tmp_path_factory.mktemp("trained"), training__max_steps=20, eval__interval=0
    )
    return ck / "latest"


def test_trained_tiny_checkpoint_converts_both_ways(trained, tmp_path):
    hf, back = tmp_path / "hf", tmp_path / "back"
    proc = run_cli("--checkpoint", trained, "--to", "hf", "--out", hf)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("--from", "hf", hf, "--out", back)
    assert proc.returncode == 0, proc.stderr
    a, _, meta = ckpt.load_checkpoint(trained)
    b, _, new_meta = ckpt.load_checkpoint(back / "latest")
    assert sorted(a) == sorted(b)
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    assert new_meta["config"] == meta["config"] and new_meta["step"] == meta["step"]


@needs_transformers
def test_trained_tiny_checkpoint_parity(trained, tmp_path, tiny_corpus):
    from transformers import AutoModelForCausalLM

    model, tok, _ = load_model(trained)
    ids = tok.encode(tiny_corpus.read_text()[-3000:])[:64]
    ours = mlx_logits(model, ids)
    pt, hf_dir = tmp_path / "m.pt", tmp_path / "hf"
    assert convert_("--checkpoint", trained, "--to", "torch", "--out", pt) == 0
    assert convert_("--checkpoint", trained, "--to", "hf", "--out", hf_dir) == 0
    ref = torch_model.load(pt)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        assert_close(ours, ref(torch.tensor([ids])).numpy(), "trained: MLX vs torch")
        assert_close(ours, hf(torch.tensor([ids])).logits.numpy(), "trained: MLX vs HF")
    greedy = list(generate_tokens(model, ids[:8], 32))
    assert greedy == torch_model.generate_greedy(ref, ids[:8], 32)


@needs_transformers
def test_from_hf_imports_a_transformers_llama(tmp_path, capsys):
    """A Llama folder written by transformers itself (untied head, no tokenizer of
    ours) imports into a checkpoint whose MLX logits match transformers'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rope_theta=500.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert convert_("--from", "hf", tmp_path / "hf", "--out", tmp_path / "ck") == 0
    assert "warning" in capsys.readouterr().err  # no tokenizer to import
    weights, _, meta = ckpt.load_checkpoint(tmp_path / "ck/latest")
    cfg = config_from_dict(meta["config"])
    model = Model(cfg.model)
    model.load_weights(list(weights.items()), strict=True)
    ids = list(range(3, 99, 3))
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    assert_close(mlx_logits(model, ids), theirs, "imported Llama: MLX vs transformers")


# ------------------------------------------------------------------ user mistakes


def _hf_folder(tmp_path, source, **edits) -> Path:
    path = source[0]
    out = tmp_path / "hf"
    assert convert_("--checkpoint", path, "--to", "hf", "--out", out) == 0
    config = json.loads((out / "config.json").read_text())
    config.update(edits)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "edits, words",
    [
        ({"attention_bias": True}, "attention_bias=true"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act='gelu_pytorch_tanh'"),
        ({"intermediate_size": 128}, "weights do not match config.json"),
    ],
)
def test_from_hf_refuses_what_it_cannot_run(tmp_path, source, capsys, edits, words):
    folder = _hf_folder(tmp_path, source, **edits)
    assert convert_("--from", "hf", folder, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_cli_mistakes_exit_2_without_traceback(tmp_path, source, capsys):
    path, o, nope, full = source[0], tmp_path / "o", tmp_path / "nope", tmp_path / "f"
    full.mkdir()
    (full / "x").write_text("x")
    cases = [
        ["--checkpoint", path, "--out", o],  # no --to
        ["--checkpoint", nope, "--to", "hf", "--out", o],
        ["--checkpoint", path, "--to", "hf", "--out", full],  # not empty
        ["--checkpoint", path, "--to", "torch", "--out", "/proc/m.pt"],
        ["--from", "gguf", tmp_path, "--out", o],
        ["--from", "hf", nope, "--out", o],
    ]
    for argv in cases:
        assert convert_(*argv) == 2, argv
        err = capsys.readouterr().err
        assert "error: " in err and "Traceback" not in err, (argv, err)


def test_export_refuses_a_config_no_standard_type_expresses(source):
    cfg = config_from_dict(ckpt.read_meta(source[0])["config"])
    cfg.model.parallel_blocks = True  # a future option Llama/Qwen3 cannot express
    with pytest.raises(ConvertError, match="parallel_blocks"):
        hf.hf_config(cfg, "fp32", 0)


# ------------------------------------------------------------------ model card


def card_rows(text: str) -> dict[str, str]:
    """The `| key | value |` rows of a model card's tables."""
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", text, flags=re.M)
    return {k: v for k, v in rows if set(k) - {"-"}}


def card_number(rows: dict, key: str) -> float:
    return float(rows[key].replace(",", ""))


def test_model_card_numbers_equal_the_run(trained, tmp_path, tiny_corpus):
    """The card of a real 20-step run: every number parsed and compared with the
    checkpoint's meta.json, its weights and the run's metrics.jsonl."""
    out = tmp_path / "hf"
    proc = run_cli("--checkpoint", trained, "--to", "hf", "--out", out)
    assert proc.returncode == 0, proc.stderr
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-generation" and "llama" in front["tags"]
    weights, _, meta = ckpt.load_checkpoint(trained)
    cfg = config_from_dict(meta["config"])
    m, t = cfg.model, cfg.training
    rows = card_rows(text)
    assert card_number(rows, "parameters") == sum(v.size for v in weights.values())
    for key, value in [("d_model", m.d_model), ("layers", m.n_layers),
                       ("attention heads", m.n_heads), ("kv heads", m.kv_heads),
                       ("context length", m.context_length),
                       ("vocabulary", m.vocab_size), ("step", meta["step"])]:  # fmt: skip
        assert card_number(rows, key) == value, key
    assert meta["step"] == 20
    tokens = 20 * t.batch_size * t.grad_accum_steps * m.context_length
    assert card_number(rows, "tokens seen") == tokens
    assert rows["training data"] == f"`{cfg.data.train_path}`"
    assert tiny_corpus.name in rows["made from"]  # from the token files' meta.json
    log = Path(cfg.logging.dir) / cfg.run_name / "metrics.jsonl"
    evals = [json.loads(line) for line in log.read_text().splitlines()]
    row = [r for r in evals if r["event"] == "eval" and r["step"] == 20][-1]
    assert card_number(rows, "validation step") == 20
    assert math.isclose(card_number(rows, "validation loss"), meta["val_loss"],
                        abs_tol=5e-5)  # fmt: skip
    assert math.isclose(card_number(rows, "perplexity"), row["val_ppl"], abs_tol=5e-4)
    assert math.isclose(card_number(rows, "bits per byte"), row["val_bpb"],
                        abs_tol=5e-5)  # fmt: skip
    assert f'from_pretrained("{out}")' in text and f'--model "{out}"' in text
    assert "no chat template" in text


def _card(tmp_path, source, **meta) -> tuple[str, dict]:
    """Export a checkpoint laid out as a run started in tmp_path (checkpoints/run/
    step_00000007, logs/run/) with `meta` added; its card and rows."""
    cfg = config_from_dict(ckpt.read_meta(source[0])["config"])
    tok_dir = source[0] / "tokenizer"
    path = make_checkpoint(
        tmp_path / "checkpoints" / cfg.run_name, tok_dir, cfg, **meta
    )
    out = tmp_path / "hf"
    assert convert_("--checkpoint", path, "--to", "hf", "--out", out) == 0
    text = (out / "README.md").read_text()
    return text, card_rows(text)


def _log(tmp_path, **row) -> None:
    log = tmp_path / "logs" / "run"
    log.mkdir(parents=True)
    rows = [{"event": "train", "step": 7, "loss": 9.0},
            {"event": "eval", "step": 7, **row}]  # fmt: skip
    (log / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_model_card_never_invents_numbers(source, tmp_path):
    # nothing recorded: no validation numbers at all
    text, rows = _card(tmp_path / "a", source)
    assert rows["validation loss"] == "not recorded for this step"
    assert "perplexity" not in rows and "bits per byte" not in rows
    assert "datasets" not in yaml.safe_load(text.split("---\n")[1])
    # meta.json's loss; the log's row of the same step and loss gives bpb; the
    # token files' meta.json (relative to where the run started) names a dataset
    _log(tmp_path / "b", val_loss=2.5, val_ppl=math.exp(2.5), val_bpb=1.2345)
    data = (
        tmp_path / "b" / Path(ckpt.read_meta(source[0])["config"]["data"]["train_path"])
    )
    data.parent.mkdir(parents=True)
    data.write_bytes(b"")
    hub = {"hf_dataset": "roneneldan/TinyStories", "config": None, "split": "train"}
    (data.parent / "meta.json").write_text(json.dumps({"inputs": [hub]}))
    text, rows = _card(tmp_path / "b", source, val_loss=2.5)
    assert card_number(rows, "validation loss") == 2.5
    assert math.isclose(card_number(rows, "perplexity"), math.exp(2.5), abs_tol=5e-4)
    assert card_number(rows, "bits per byte") == 1.2345
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["datasets"] == ["roneneldan/TinyStories"]
    assert rows["made from"] == "roneneldan/TinyStories (Hugging Face hub, split train)"
    # a log row of another run (another loss) is not believed
    _log(tmp_path / "c", val_loss=3.0, val_ppl=math.exp(3.0), val_bpb=1.5)
    text, rows = _card(tmp_path / "c", source, val_loss=2.5)
    assert card_number(rows, "validation loss") == 2.5
    assert rows["bits per byte"] == "not recorded"


@needs_transformers
def test_chat_model_card_and_template(source, tmp_path):
    """A model trained on conversations: the card says so, and transformers'
    apply_chat_template renders exactly our template."""
    from transformers import AutoTokenizer

    text, _ = _card(tmp_path, source, chat_template=True)
    assert "trained on conversations" in text and "apply_chat_template" in text
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "A story?"}]  # fmt: skip
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == render_conversation(messages)
    ids = tok.encode(rendered, add_special_tokens=False)
    assert ids == source[2].encode(rendered)  # the markers are single tokens
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_hf_export_folder_is_not_private(source, tmp_path):
    """The folder --to hf makes (none there before) has the usual permissions,
    not the 0700 of a temporary folder."""
    out = tmp_path / "new" / "hf"
    out.parent.mkdir()
    assert convert_("--checkpoint", source[0], "--to", "hf", "--out", out) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask != 0o700
    assert (out / "README.md").is_file()


# ------------------------------------------------ model options (model.mlp, ...)

MODEL_OPTIONS = {
    "geglu": {"mlp": "geglu"},
    "silu": {"mlp": "silu"},
    "gelu": {"mlp": "gelu"},
    "relu2": {"mlp": "relu2"},
    "layernorm": {"norm": "layernorm"},
    "no-norm": {"norm": "none", "qk_norm": True},
    "post": {"norm_position": "post"},
    "post-layernorm": {"norm": "layernorm", "norm_position": "post"},
    "nope": {"position": "none"},
    "local-global": {"sliding_window": 8, "global_every": 2},
}


def _option_checkpoint(tmp_path, tiny_dataset, tiny_config, **opts) -> Path:
    # untied: random weights without a final norm (post, none) and a tied head
    # mostly predict the input token again, a decode too flat to compare
    cfg = tiny_config(vocab_size=512, d_model=64, context_length=64, init_std=0.15,
                      n_kv_heads=2, tie_embeddings=False, **opts)  # fmt: skip
    return make_checkpoint(tmp_path / "run", tiny_dataset["tokenizer"], cfg)


@needs_torch
@pytest.mark.parametrize("opts", MODEL_OPTIONS.values(), ids=MODEL_OPTIONS.keys())
def test_torch_reference_matches_mlx_with_model_options(
    opts, tmp_path, tiny_dataset, tiny_config
):
    """Each option in the PyTorch reference: random weights (norms off 1), the
    `--to torch` export loaded strictly, logits and 32 greedy tokens equal."""
    path = _option_checkpoint(tmp_path, tiny_dataset, tiny_config, **opts)
    model, _, _ = load_model(path)
    ids = np.random.default_rng(0).integers(0, 512, 48).tolist()
    pt = tmp_path / "m.pt"
    assert convert_("--checkpoint", path, "--to", "torch", "--out", pt) == 0
    ref = torch_model.load(pt)  # strict=True inside
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).numpy()
    assert_close(mlx_logits(model, ids), theirs, f"{opts}: MLX vs torch reference")
    assert mlx_greedy(model, ids) == torch_model.generate_greedy(ref, ids[:8], 32)


@needs_transformers
def test_geglu_exports_as_llama_gelu_and_imports_back(
    tmp_path, tiny_dataset, tiny_config, capsys
):
    """model.mlp=geglu is Llama with hidden_act "gelu" (exact): transformers'
    logits equal ours, the export warns about mlx-lm, and --from hf (with our
    stashed config or without it) gives geglu back."""
    from transformers import AutoModelForCausalLM

    from src.checkpoint.hf_folder import STASH, model_config_from_hf

    path = _option_checkpoint(tmp_path, tiny_dataset, tiny_config, mlp="geglu")
    model, _, _ = load_model(path)
    out = tmp_path / "hf"
    assert convert_("--checkpoint", path, "--to", "hf", "--out", out) == 0
    assert "mlx-lm's llama ignores hidden_act" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["hidden_act"]) == ("llama", "gelu")
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(1).integers(0, 512, 48).tolist()
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits.numpy()
    assert_close(mlx_logits(model, ids), theirs, "geglu: MLX vs transformers")
    assert convert_("--from", "hf", out, "--out", tmp_path / "back") == 0
    back = ckpt.resolve_resume(str(tmp_path / "back/latest"), tmp_path / "back")
    meta = ckpt.read_meta(back)
    assert meta["config"]["model"]["mlp"] == "geglu"
    del config[STASH]  # a Llama folder with hidden_act gelu from elsewhere
    imported = model_config_from_hf(config)
    assert imported.mlp == "geglu" and imported.d_ff is None
    assert imported.ffn_dim == model.config.ffn_dim


@pytest.mark.parametrize(
    "opts, words",
    [
        ({"mlp": "relu2"}, "model.mlp=relu2 (a plain, ungated MLP)"),
        ({"mlp": "silu"}, "model.mlp=silu"),
        ({"norm": "layernorm"}, "model.norm=layernorm"),
        ({"norm": "none"}, "model.norm=none"),
        ({"norm_position": "post"}, "model.norm_position=post"),
        ({"position": "none"}, "model.position=none"),
    ],
)
def test_hf_export_refuses_options_llama_cannot_compute(
    opts, words, tmp_path, tiny_dataset, tiny_config, capsys
):
    path = _option_checkpoint(tmp_path, tiny_dataset, tiny_config, **opts)
    assert convert_("--checkpoint", path, "--to", "hf", "--out", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err
    assert "no Hugging Face Llama/Qwen3 equivalent" in err
    assert not (tmp_path / "hf").exists()


def test_option_export_refusals_through_the_cli(tmp_path, tiny_dataset, tiny_config):
    """`python -m src.convert`: a relu2 model to hf, a geglu one to gguf: one
    error line, exit 2, nothing written; the relu2 one still exports to torch."""
    relu2 = _option_checkpoint(tmp_path / "a", tiny_dataset, tiny_config, mlp="relu2")
    geglu = _option_checkpoint(tmp_path / "b", tiny_dataset, tiny_config, mlp="geglu")
    cases = [
        (relu2, "hf", tmp_path / "hf", "model.mlp=relu2"),
        (geglu, "gguf", tmp_path / "m.gguf", "model.mlp=geglu: llama.cpp"),
    ]
    for path, to, out, words in cases:
        proc = run_cli("--checkpoint", path, "--to", to, "--out", out)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert words in lines[0] and not out.exists()
    if torch is not None:  # the PyTorch reference computes every option
        pt = tmp_path / "relu2.pt"
        assert convert_("--checkpoint", relu2, "--to", "torch", "--out", pt) == 0
