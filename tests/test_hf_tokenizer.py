"""Hugging Face tokenizers as the second kind, and Hugging Face model folders as
checkpoints: a byte-level BPE trained here with the `tokenizers` library and saved
by transformers (`save_pretrained`), and a tiny random Llama (and Qwen3) saved
beside it; then `src.inference`, `src.eval`, `src.data prepare` and
`src.tokenizer` run on those folders (through real subprocesses) and agree with
transformers and the tokenizers library: greedy text, loss, token ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from commands import run, user_error
from hf_models import CONTEXT, EOT, VOCAB, hf_folder, train_bpe

from src.errors import TokenizerError
from src.tokenizer.kinds import load_tokenizer, save_tokenizer, tokenizer_kind

torch = pytest.importorskip("torch", reason="needs the torch extra")
transformers = pytest.importorskip("transformers", reason="needs transformers")
tokenizers = pytest.importorskip("tokenizers", reason="needs tokenizers")

PROMPT = "Once upon a time, there was a little"
ROUND_TRIP = [
    "",
    "Once upon a time, there was a little girl named Lily.",
    "emoji 😀👍🏽 family 👨‍👩‍👧; CJK 日本語; e\u0301 combining; \u2581 marker",
    "  leading, trailing  \ttabs\r\nCRLF\n\nNUL \x00 ",
]


@pytest.fixture(scope="module")
def corpus(story_corpus) -> Path:
    """About 200 KB of stories (conftest: TinyStories, or synthetic without it)."""
    return story_corpus(200_000)


@pytest.fixture(scope="module")
def hf_tok_dir(corpus, tmp_path_factory) -> Path:
    """A byte-level BPE (GPT-2 style) trained on the corpus, saved by transformers
    as a model on the Hub ships it: tokenizer.json + tokenizer_config.json."""
    text = corpus.read_text(encoding="utf-8")
    return train_bpe(text, tmp_path_factory.mktemp("hf-tok"))


@pytest.fixture(scope="module")
def spm_dirs(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """Two SentencePiece tokenizers of ours: one that fits the models' VOCAB rows,
    one 16 tokens too large."""
    from src.tokenizer.training import train_tokenizer

    root = tmp_path_factory.mktemp("spm")
    return tuple(
        train_tokenizer([corpus], root / str(n), vocab_size=n).dir
        for n in (360, VOCAB + 16)
    )


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def hf_model(request, hf_tok_dir, tmp_path_factory):
    """(folder with config.json, model.safetensors and the tokenizer, the torch
    model) of a tiny random Llama, then Qwen3."""
    folder = hf_folder(
        tmp_path_factory.mktemp(f"hf-{request.param}"), request.param, hf_tok_dir
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return folder, model


# ------------------------------------------------------------- the tokenizer


def test_hf_tokenizer_matches_the_library_and_round_trips(hf_tok_dir):
    from tokenizers import Tokenizer

    tok = load_tokenizer(hf_tok_dir)
    lib = Tokenizer.from_file(str(hf_tok_dir / "tokenizer.json"))
    assert tok.kind == "huggingface" and tokenizer_kind(hf_tok_dir) == "huggingface"
    assert tok.vocab_size == VOCAB == lib.get_vocab_size()
    assert tok.eos_id == tok.bos_id == lib.token_to_id(EOT)
    for text in ROUND_TRIP:
        ids = tok.encode(text)
        assert ids == lib.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text, "byte-level BPE: exact round trip"
    assert tok.encode_batch(ROUND_TRIP, eos=True) == [
        tok.encode(t) + [tok.eos_id] for t in ROUND_TRIP
    ]
    # special tokens: their text becomes their id, and they decode to ""
    assert tok.encode(f"a{EOT}b") == tok.encode("a") + [tok.eos_id] + tok.encode("b")
    assert tok.decode(tok.encode("Hi", bos=True, eos=True)) == "Hi"
    assert tok.id_to_piece(tok.eos_id) == EOT
    with pytest.raises(TokenizerError, match=str(VOCAB)):
        tok.decode([1, VOCAB])
    with pytest.raises(TokenizerError, match="not valid UTF-8"):
        tok.encode("bad \udcff byte")
    # sha256: of tokenizer.json and the special ids; another EOS is another hash
    sha = load_tokenizer(hf_tok_dir / "tokenizer.json").sha256
    assert sha == tok.sha256 and len(sha) == 64


def test_hf_tokenizer_special_tokens_and_copies(hf_tok_dir, tmp_path):
    tok = load_tokenizer(hf_tok_dir)
    copy = tmp_path / "copy"
    names = sorted(p.name for p in save_tokenizer(tok, copy))
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    assert load_tokenizer(copy).sha256 == tok.sha256
    # eos named in config.json alone (no tokenizer_config.json): found there
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((hf_tok_dir / "tokenizer.json").read_bytes())
    with pytest.raises(TokenizerError, match="no EOS token"):
        load_tokenizer(bare)
    (bare / "config.json").write_text(json.dumps({"eos_token_id": [tok.eos_id, 7]}))
    loaded = load_tokenizer(bare)
    assert loaded.eos_id == tok.eos_id and loaded.bos_id is None
    alone = tmp_path / "alone"  # its copy names the EOS itself
    assert "tokenizer_config.json" in [p.name for p in save_tokenizer(loaded, alone)]
    assert load_tokenizer(alone).sha256 == loaded.sha256
    with pytest.raises(TokenizerError, match="exists: not replaced"):
        save_tokenizer(loaded, alone)
    with pytest.raises(TokenizerError, match="no BOS"):
        loaded.encode("x", bos=True)
    (bare / "config.json").write_text(json.dumps({"eos_token_id": VOCAB}))
    with pytest.raises(TokenizerError, match=f"eos_token_id {VOCAB} is outside"):
        load_tokenizer(bare)
    # a named token missing from the vocabulary is refused, naming it
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="<nope>"):
        load_tokenizer(bare)


def test_kind_of_a_folder_with_both_files(hf_tok_dir, spm_dirs, tmp_path):
    """tokenizer.model wins when it is ours (our exports hold both files); one we
    cannot load (Llama 2's, or damaged) gives way to tokenizer.json. Callers that
    still call spm's Tokenizer.load get the same tokenizer from `tok.file`."""
    from src.tokenizer.spm import Tokenizer

    both = tmp_path / "both"
    both.mkdir()
    for f in [*hf_tok_dir.iterdir(), spm_dirs[0] / "tokenizer.model"]:
        (both / f.name).write_bytes(f.read_bytes())
    assert load_tokenizer(both).kind == "sentencepiece" == tokenizer_kind(both)
    (both / "tokenizer.model").write_bytes(b"not ours")
    tok = load_tokenizer(both)
    assert tok.kind == "huggingface" and tok.file == both / "tokenizer.json"
    assert Tokenizer.load(tok.file).sha256 == tok.sha256
    assert Tokenizer.load(hf_tok_dir).sha256 == tok.sha256  # no tokenizer.model


def test_tokenizer_cli_encodes_with_hf_tokenizer(hf_tok_dir):
    from tokenizers import Tokenizer

    lib = Tokenizer.from_file(str(hf_tok_dir / "tokenizer.json"))
    proc = run("tokenizer", "encode", "--tokenizer", hf_tok_dir, "--text", PROMPT)
    assert proc.returncode == 0, proc.stderr
    ids = lib.encode(PROMPT, add_special_tokens=False).ids
    assert proc.stdout.split() == [str(i) for i in ids]


def test_errors_name_the_folder_and_what_is_missing(hf_tok_dir, corpus, tmp_path):
    """Through subprocesses: a folder with neither kind, and a damaged
    tokenizer.json, each one `error:` line naming the folder or file, exit 2."""
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    for folder, words in (
        (empty, [str(empty), "neither tokenizer.model nor", "tokenizer.json"]),
        (broken, [str(broken / "tokenizer.json"), "not a Hugging Face tokenizer"]),
    ):
        proc = run("data", "prepare", "--input", corpus, "--tokenizer", folder,
                   "--output", tmp_path / "out")  # fmt: skip
        user_error(proc, *words)
        proc = run("tokenizer", "encode", "--tokenizer", folder, "--text", "hi")
        user_error(proc, *words)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ data prepare


def test_prepare_with_hf_tokenizer_writes_its_ids(hf_tok_dir, tmp_path):
    from tokenizers import Tokenizer

    from src.data.tokens import open_tokens

    docs = [f"Story {i}: Tom saw a {w} dog. It was 😀 happy!" for i, w in
            enumerate(["big", "small", "red", "tiny", "old", "kind"] * 5)]  # fmt: skip
    src = tmp_path / "docs.txt"
    src.write_text("".join(f"{d}\n{EOT}\n" for d in docs), encoding="utf-8")
    out = tmp_path / "data"
    proc = run("data", "prepare", "--input", src, "--tokenizer", hf_tok_dir,
               "--output", out, "--min-words", "0", "--workers", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(hf_tok_dir)
    assert meta["tokenizer"]["kind"] == "huggingface"
    assert meta["tokenizer"]["sha256"] == tok.sha256
    assert meta["tokenizer"]["eos_id"] == tok.eos_id
    lib = Tokenizer.from_file(str(hf_tok_dir / "tokenizer.json"))
    want = {tuple(lib.encode(d, add_special_tokens=False).ids) + (tok.eos_id,)
            for d in docs}  # fmt: skip
    got = []
    for split in ("train", "val"):
        ids = np.asarray(open_tokens(out / f"{split}.bin")).tolist()
        cuts = [i + 1 for i, t in enumerate(ids) if t == tok.eos_id]
        got += [tuple(ids[a:b]) for a, b in zip([0, *cuts], cuts)]
    assert sorted(got) == sorted(want), "each document: the library's ids + EOS"
    # `src.data stats` counts documents by that tokenizer's EOS (from meta.json)
    proc = run("data", "stats", out / "train.bin")
    assert json.loads(proc.stdout)["docs"] == meta["splits"]["train"]["docs"]


# ------------------------------------------------- a Hugging Face model folder


def test_inference_on_hf_folder_matches_transformers_greedy(hf_model):
    folder, model = hf_model
    tok = load_tokenizer(folder)
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=5, do_sample=False,
            eos_token_id=tok.eos_id, pad_token_id=tok.eos_id,
        )  # fmt: skip
    new = out[0, len(ids) :].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    proc = run("inference", "--checkpoint", folder, "--prompt", PROMPT,
               "--seed", "1", "--max-tokens", "5", "--temperature", "0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{PROMPT}{tok.decode(new)}\n---\n", (new, proc.stdout)
    # sampled (the defaults) runs too
    proc = run("inference", "--checkpoint", folder, "--prompt", PROMPT,
               "--seed", "1", "--max-tokens", "5")  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith(PROMPT), proc.stderr


def test_eval_on_hf_folder_matches_transformers_loss(hf_model, corpus, tmp_path):
    folder, model = hf_model
    tok = load_tokenizer(folder)
    docs = corpus.read_text(encoding="utf-8").split(f"\n{EOT}\n")[:12]
    data = tmp_path / "valid.txt"
    data.write_text("".join(f"{d}\n{EOT}\n" for d in docs), encoding="utf-8")
    proc = run("eval", "--checkpoint", folder, "--data", data, "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    # the same windows in transformers: documents as `ids EOS`, concatenated,
    # non-overlapping windows of CONTEXT + 1 tokens
    tokens = [t for d in docs if d.strip() for t in tok.encode(d.strip(), eos=True)]
    n = (len(tokens) - 1) // CONTEXT
    windows = torch.tensor(
        [tokens[i * CONTEXT : i * CONTEXT + CONTEXT + 1] for i in range(n)]
    )
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits.double()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    ).item()
    assert got["windows"] == n and got["tokens"] == n * CONTEXT
    assert abs(got["loss"] - loss) < 1e-4, (got["loss"], loss)


def test_hf_folder_tokenizer_choice(hf_model, spm_dirs, corpus, tmp_path):
    """A Hugging Face folder's own tokenizer.json is its tokenizer; one that also
    holds our tokenizer.model (as our exports do) uses ours; one without any says
    what is missing (one `error:` line), and `--tokenizer` then supplies one."""
    from src.checkpoint.contents import load_model
    from src.errors import ConfigError

    folder, _ = hf_model
    model, tok, meta = load_model(folder)
    assert tok.kind == "huggingface" and meta["tokenizer_kind"] == "huggingface"
    assert meta["step"] == 0 and meta["tokenizer_sha256"] == tok.sha256
    assert model.config.vocab_size == VOCAB
    ours = tmp_path / "ours"
    ours.mkdir()
    for f in folder.iterdir():
        (ours / f.name).write_bytes(f.read_bytes())
    small, big = spm_dirs
    (ours / "tokenizer.model").write_bytes((small / "tokenizer.model").read_bytes())
    _, tok, meta = load_model(ours)
    assert tok.kind == "sentencepiece" and tok.sha256 == load_tokenizer(small).sha256
    assert meta["tokenizer_kind"] == "sentencepiece"
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    proc = run("inference", "--checkpoint", bare, "--prompt", "Hi")
    user_error(proc, str(bare), "neither tokenizer.model nor")
    proc = run("inference", "--checkpoint", bare, "--tokenizer", folder,
               "--prompt", "Hi", "--max-tokens", "2", "--temperature", "0")  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("Hi"), proc.stderr
    proc = run("eval", "--checkpoint", bare, "--data", corpus)  # no tokenizer
    user_error(proc, str(bare), "neither tokenizer.model nor")
    with pytest.raises(ConfigError, match=f"{VOCAB + 16} tokens .* {VOCAB}"):
        load_model(bare, big)


def test_hf_folder_errors_are_one_line(hf_tok_dir, tmp_path):
    """A folder with config.json is read as a Hugging Face model: a model type
    we cannot run, or no weights, is one `error:` line naming the file, exit 2."""
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    user_error(
        run("eval", "--checkpoint", other, "--data", hf_tok_dir / "tokenizer.json"),
        str(other / "config.json"),
        "model_type 'gpt2' is not supported",
    )
    empty = tmp_path / "no-weights"
    empty.mkdir()
    config = dict(model_type="llama", hidden_size=64, num_attention_heads=4,
                  num_hidden_layers=2, intermediate_size=128,
                  vocab_size=VOCAB)  # fmt: skip
    (empty / "config.json").write_text(json.dumps(config))
    user_error(
        run("inference", "--checkpoint", empty, "--prompt", "Hi"),
        str(empty),
        "no *.safetensors weights",
    )


def test_our_hf_export_reads_back_as_the_checkpoint(spm_dirs, tiny_config, tmp_path):
    """`--checkpoint out/hf` on our own export (our tokenizer.model beside
    tokenizer.json, our config stashed) is the checkpoint: same step, tokenizer,
    loss and greedy text."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from src.checkpoint import store
    from src.checkpoint.contents import build_meta
    from src.eval.cli import evaluate_checkpoint
    from src.model.transformer import Model

    tok = load_tokenizer(spm_dirs[0])
    cfg = tiny_config(vocab_size=tok.vocab_size, context_length=32)
    mx.random.seed(3)
    weights = dict(tree_flatten(Model(cfg.model).parameters()))
    meta = build_meta(cfg, tok.sha256, tok.kind)
    ck = store.save_checkpoint(tmp_path / "run", 7, weights, {}, meta, tok.dir)
    out = tmp_path / "hf"
    assert (
        run("convert", "--checkpoint", ck, "--to", "hf", "--out", out).returncode == 0
    )
    data = tmp_path / "valid.txt"
    data.write_text(f"Tom had a red ball. He was happy.\n{EOT}\n" * 20)
    want = evaluate_checkpoint(str(ck), str(data))
    proc = run("eval", "--checkpoint", out, "--data", data, "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert (got["step"], got["tokens"]) == (7, want["tokens"])
    assert abs(got["loss"] - want["loss"]) < 1e-6, (got["loss"], want["loss"])
    texts = [
        run("inference", "--checkpoint", c, "--prompt", "Tom had", "--max-tokens",
            "8", "--temperature", "0").stdout
        for c in (ck, out)
    ]  # fmt: skip
    assert texts[0] == texts[1] and texts[0].startswith("Tom had"), texts


def test_import_and_export_keep_a_hugging_face_tokenizer(hf_model, tmp_path):
    """--from hf imports the folder's tokenizer.json (kind recorded); the
    checkpoint generates what the folder does; --to hf writes the same
    tokenizer.json back with its own special-token ids, and transformers loads
    the export with logits equal to the original's."""
    folder, model = hf_model
    proc = run("convert", "--from", "hf", folder, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    (ckpt,) = (tmp_path / "run").glob("step_*")
    meta = json.loads((ckpt / "meta.json").read_text())
    tok = load_tokenizer(folder)
    assert (
        meta["tokenizer_kind"] == "huggingface"
        and meta["tokenizer_sha256"] == tok.sha256
    )
    assert (ckpt / "tokenizer" / "tokenizer.json").read_bytes() == (
        folder / "tokenizer.json"
    ).read_bytes()
    args = ("--prompt", PROMPT, "--max-tokens", "5", "--temperature", "0")
    direct = run("inference", "--checkpoint", folder, *args)
    imported = run("inference", "--checkpoint", ckpt, *args)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == direct.stdout
    proc = run("convert", "--checkpoint", ckpt, "--to", "hf", "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "hf"
    assert (out / "tokenizer.json").read_bytes() == (
        folder / "tokenizer.json"
    ).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_id
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        diff = (again(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
