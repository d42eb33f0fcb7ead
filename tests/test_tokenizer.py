"""Tokenizer: exact round trip (V5), fixed special ids, determinism, and clear
errors for bad training input (V4). One tiny tokenizer is trained per module."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from src.errors import TokenizerError
from src.tokenizer import cli as tokenizer_cli
from src.tokenizer import spm as T
from src.tokenizer.spm import Tokenizer
from src.tokenizer.training import train_tokenizer


@pytest.fixture(scope="module")
def corpus(story_corpus) -> Path:
    """About 200 KB of stories (conftest: TinyStories, or synthetic without it)."""
    return story_corpus(200_000)


ROUND_TRIP = [
    "",
    "Once upon a time, there was a little girl named Lily.",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "accents héllo, naïve; CJK 日本語 한국어; RTL مرحبا; e\u0301 (combining)",
    "NUL \x00 in the \x00\x00 middle",
    "windows\r\nline\r\nends\r\n",
    "\ttabs\t\tand\tmore\t",
    "runs    of     spaces          and trailing   ",
    "   leading spaces",
    " ",
    "\n",
    "\n\nblank lines\n\n\n",
    "the marker \u2581 itself, \u2581\u2581 twice, and \u2581 next to space",
    "<|user|>hi<|end|><|assistant|>hello<|end|>",
    "<s> </s> <pad> <unk> <0x41> ⁇ look like specials",
    "\u00a0nbsp \u3000 ideographic space \u200b zero width",
    "\ufeffbom \U0010ffff max code point \x7f del",
]


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus], out, vocab_size=512, seed=0)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.load(tok_dir)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert T.UNK_ID not in ids, "byte fallback must make <unk> impossible"


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    pools = [(0, 128), (0, 0xD800), (0xE000, 0x110000), (0x2581, 0x2582), (9, 14)]
    for _ in range(500):
        text = "".join(
            chr(rng.randrange(*rng.choice(pools))) for _ in range(rng.randrange(40))
        )
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_encode_batch_matches_encode(tok):
    texts = ROUND_TRIP + ["a" * 5000, "x\u2581y"]
    for bos, eos in [(False, False), (True, True)]:
        fast = tok.encode_batch(texts, bos=bos, eos=eos)
        slow = [tok.encode(t, bos=bos, eos=eos) for t in texts]
        bad = [t for t, f, s in zip(texts, fast, slow, strict=True) if f != s]
        assert not bad, f"encode_batch differs from encode on {bad!r}"


def test_special_ids(tok, tok_dir):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    for i, piece in enumerate(T.SPECIAL_TOKENS + T.CHAT_MARKERS):
        assert tok.id_to_piece(i) == piece
    assert tok.encode("<|user|>") == [len(T.SPECIAL_TOKENS) + 1]  # id 5
    ids = tok.encode("Hello", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "Hello"  # bos/eos decode to nothing
    assert tok.vocab_size == 512


def test_metadata_and_load(tok, tok_dir, corpus):
    meta = json.loads((tok_dir / "tokenizer_info.json").read_text())
    assert not (tok_dir / "tokenizer.json").exists()  # Hugging Face's name
    assert meta["vocab_size"] == 512 and meta["model_type"] == "bpe"
    assert meta["sha256"] == tok.sha256
    assert (
        meta["special_tokens"]["</s>"] == 3 and meta["special_tokens"]["<|end|>"] == 7
    )
    assert meta["corpus"]["bytes"] == corpus.stat().st_size
    assert meta["corpus"]["files"] == [
        {"path": str(corpus), "bytes": corpus.stat().st_size}
    ]
    from_file = Tokenizer.load(tok_dir / "tokenizer.model")
    assert from_file.sha256 == tok.sha256 and from_file.dir == tok_dir


def test_old_layout_folder_loads(tok, tok_dir, tmp_path):
    """A folder from before the info file was renamed (info in tokenizer.json,
    Hugging Face's name) loads as SentencePiece, its info still read; training
    into it again replaces the old info file rather than leaving it stale."""
    from src.tokenizer.kinds import load_tokenizer, save_tokenizer, tokenizer_kind

    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    info = (tok_dir / "tokenizer_info.json").read_text()
    (old / "tokenizer.json").write_text(info)
    assert tokenizer_kind(old) == "sentencepiece"
    for loaded in (load_tokenizer(old), Tokenizer.load(old)):
        assert loaded.kind == "sentencepiece" and loaded.sha256 == tok.sha256
    assert T.read_info(old) == json.loads(info)
    copies = save_tokenizer(load_tokenizer(old), tmp_path / "copy")
    assert sorted(c.name for c in copies) == ["tokenizer.json", "tokenizer.model"]
    assert load_tokenizer(tmp_path / "copy").sha256 == tok.sha256
    (old / "tokenizer.model").unlink()  # the info file alone is no tokenizer
    with pytest.raises(TokenizerError, match="info file .* tokenizer.model"):
        load_tokenizer(old)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "nope"))):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.load(tmp_path)  # a folder without tokenizer.model
    (tmp_path / "tokenizer.model").write_bytes(b"not a protobuf")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer.load(tmp_path)


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(TokenizerError, match="512"):
        tok.decode([5, 512])
    with pytest.raises(TokenizerError, match="-1"):
        tok.decode([-1])


def test_same_seed_same_model(corpus, tmp_path):
    # A sample smaller than the corpus, so the seed matters; training twice in one
    # process is where sentencepiece's own seeding would fail.
    def train(seed, name):
        train_tokenizer([corpus], tmp_path / name, 400, max_sentences=300, seed=seed)
        return (tmp_path / name / "tokenizer.model").read_bytes()

    a, b, c = train(1, "a"), train(1, "b"), train(2, "c")
    assert a == b, "same seed must give a byte-identical model"
    assert a != c, "a different seed must draw a different line sample"


def run(capsys, *argv):
    code = tokenizer_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def bad_inputs(tmp_path, corpus):
    files = {
        "empty": b"",
        "blank": b"   \n\t\n\n",
        "delims": b"<|endoftext|>\n<|endoftext|>\n",
        "binary": bytes(range(256)) * 8,
        "latin1": "caf\xe9 au lait\n".encode("latin-1"),
        "small": b"abc def\n" * 10,
    }
    for name, data in files.items():
        (tmp_path / f"{name}.txt").write_bytes(data)
    return tmp_path


@pytest.mark.parametrize(
    "name, extra, message",
    [
        ("empty", [], "corpus is empty"),
        ("delims", [], "corpus is empty"),
        ("blank", [], "only whitespace"),
        ("binary", [], "binary file"),
        ("latin1", [], "not UTF-8"),
        ("missing", [], "no such file"),
        ("no*match", [], "no files match"),
        ("CORPUS", ["--vocab-size", "100"], "minimum is 265"),
        (
            "CORPUS",
            ["--vocab-size", "270"],
            r"too small for this corpus: .*at least \d+",
        ),
        ("small", ["--vocab-size", "300"], r"too large for this corpus: .*at most \d+"),
    ],
)
def test_train_bad_input_exits_2(capsys, bad_inputs, corpus, name, extra, message):
    path = corpus if name == "CORPUS" else bad_inputs / f"{name}.txt"
    argv = ["train", "--input", path, "--output", bad_inputs / "out"]
    argv += extra or ["--vocab-size", "512"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert re.search(r"error: .*" + message, err), err
    assert "Traceback" not in err and "INTERNAL" not in err
    if name not in ("CORPUS", "missing", "no*match", "small"):
        assert f"{name}.txt" in err, "the message must name the file"
    assert not (bad_inputs / "out" / "tokenizer.model").exists()


@pytest.mark.parametrize("bad", [["--vocab-size", "-5"], ["--model-type", "char"]])
def test_train_bad_flags_exit_2(capsys, corpus, tmp_path, bad):
    argv = [
        "train",
        "--input",
        corpus,
        "--output",
        tmp_path,
        "--vocab-size",
        "512",
    ]
    code, _, err = run(capsys, *argv, *bad)
    assert code == 2 and "error:" in err


def test_cli_encode_decode_stats(capsys, tok, tok_dir, corpus):
    code, out, _ = run(
        capsys, "encode", "--tokenizer", tok_dir, "--text", "Hi 😀", "--eos"
    )
    ids = [int(x) for x in out.split()]
    assert code == 0 and ids == tok.encode("Hi 😀", eos=True)
    code, out, _ = run(capsys, "decode", "--tokenizer", tok_dir, "--ids", *ids)
    assert code == 0 and out == "Hi 😀\n"
    code, out, _ = run(capsys, "stats", "--tokenizer", tok_dir, "--input", corpus)
    size = corpus.stat().st_size
    n = len(tok.encode(corpus.read_text(encoding="utf-8")))
    assert code == 0 and f"{n} tokens, {size} bytes, {size / n:.3f} bytes/token" in out
    assert code == 0 and out.splitlines()[-1].startswith(f"total: {n} tokens")


def test_cli_errors(capsys, tok_dir, tmp_path):
    code, _, err = run(capsys, "decode", "--tokenizer", tok_dir, "--ids", "99999")
    assert code == 2 and "error: token id 99999" in err
    code, _, err = run(
        capsys, "encode", "--tokenizer", tmp_path / "none", "--text", "x"
    )
    assert code == 2 and "error:" in err and str(tmp_path / "none") in err
    assert run(capsys, "--help")[0] == 0


def test_train_on_jsonl_and_parquet_equals_txt(corpus, tmp_path, capsys):
    """Rows of a jsonl or parquet file train the same model as the same stories in
    a .txt file; a missing --text-field is a clear error naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stories = [s.strip() for s in corpus.read_text().split("<|endoftext|>\n")]
    stories = [s for s in stories if s][:150]
    txt = tmp_path / "c.txt"
    txt.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"story": s}) + "\n" for s in stories))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"story": stories}), parquet)
    models = []
    for path in (txt, jsonl, parquet):
        out = tmp_path / path.suffix[1:]
        argv = ["train", "--input", path, "--output", out, "--vocab-size", 400]
        code, _, err = run(capsys, *argv, "--text-field", "story")
        assert code == 0, err
        models.append((out / "tokenizer.model").read_bytes())
    assert models[0] == models[1] == models[2]
    code, out, err = run(
        capsys,
        "stats",
        "--tokenizer",
        tmp_path / "txt",
        "--input",
        jsonl,
        parquet,
        "--text-field",
        "story",
    )
    n = sum(len(Tokenizer.load(tmp_path / "txt").encode(s)) for s in stories)
    assert code == 0 and out.count(f": {n} tokens, ") == 2, err
    argv = ["train", "--input", jsonl, "--output", tmp_path / "x", "--vocab-size", 400]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "no field 'text'" in err and str(jsonl) in err


def test_train_on_a_hub_dataset_offline(corpus, tmp_path, capsys, monkeypatch):
    """--hf-dataset streams through datasets.load_dataset; here it is pointed at a
    local jsonl file (the same streaming code path), and --max-docs caps the rows."""
    import datasets

    stories = [s.strip() for s in corpus.read_text().split("<|endoftext|>\n")]
    stories = [s for s in stories if s][:120]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    real, calls = datasets.load_dataset, []

    def fake_hub(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return real("json", data_files=[str(jsonl)], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    argv = ["train", "--hf-dataset", "roneneldan/TinyStories", "--max-docs", "100"]
    code, _, err = run(capsys, *argv, "--output", tmp_path / "hub", "--vocab-size", 400)
    assert code == 0, err
    assert calls == [("roneneldan/TinyStories", None, "train", True)]
    monkeypatch.undo()
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories[:100]))
    argv = ["train", "--input", jsonl, "--output", tmp_path / "local"]
    assert run(capsys, *argv, "--vocab-size", 400)[0] == 0
    hub, local = (
        (tmp_path / d / "tokenizer.model").read_bytes() for d in ("hub", "local")
    )
    assert hub == local, "the first 100 rows, exactly as from a local file"
    meta = json.loads((tmp_path / "hub" / "tokenizer_info.json").read_text())
    assert meta["corpus"]["files"] == [
        {"hf_dataset": "roneneldan/TinyStories", "config": None, "split": "train"}
    ]
