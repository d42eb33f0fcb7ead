"""Token files (V2), the batch loader, `prepare`, and corpus discovery."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from src.corpus import sources as C
from src.corpus import text as CT
from src.data import cli as D
from src.data import tokens as T
from src.data.loader import TokenLoader
from src.data.tokens import validate_token_file, write_tokens
from src.errors import DataError
from src.tokenizer.spm import Tokenizer
from src.tokenizer.training import train_tokenizer


@pytest.fixture(scope="module")
def corpus(story_corpus) -> Path:
    """About 200 KB of stories (conftest: TinyStories, or synthetic without it)."""
    return story_corpus(200_000)


VOCAB, CTX = 1000, 16


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "tokens.bin"
    write_tokens(path, np.arange(500) % VOCAB, VOCAB)
    return path


# ------------------------------------------------------------------ token files


@pytest.mark.parametrize("vocab, itemsize", [(1000, 2), (65536, 2), (65537, 4)])
def test_write_read_round_trip(tmp_path, vocab, itemsize):
    tokens = np.random.default_rng(0).integers(0, vocab, 1234)
    path = tmp_path / "t.bin"
    header = write_tokens(path, tokens.tolist(), vocab)
    assert header == T.read_header(path)
    assert (header.itemsize, header.n_tokens, header.vocab_size) == (
        itemsize,
        1234,
        vocab,
    )
    assert path.stat().st_size == 32 + 1234 * itemsize
    np.testing.assert_array_equal(T.open_tokens(path), tokens)
    assert validate_token_file(path, vocab, CTX) == header
    assert list(tmp_path.iterdir()) == [path], "no temp files left behind"


def test_write_rejects_bad_ids_and_leaves_nothing(tmp_path):
    for bad in ([1, 2, VOCAB], [-1, 3]):
        with pytest.raises(ValueError, match="outside"):
            write_tokens(tmp_path / "t.bin", bad, VOCAB)
    assert list(tmp_path.iterdir()) == []


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _corrupt(path: Path, case: str) -> int:
    """Damage a good 500-token file; return the vocab size to validate with."""
    if case == "bad magic":
        _patch(path, 0, b"GPT2TOKS")
    elif case == "version":
        _patch(path, 8, struct.pack("<I", 7))
    elif case == "itemsize":
        _patch(path, 12, struct.pack("<I", 3))
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:-3])
    elif case == "trailing":
        path.write_bytes(path.read_bytes() + b"\0\0")
    elif case == "header only":
        path.write_bytes(path.read_bytes()[:20])
    elif case == "empty":
        write_tokens(path, [], VOCAB)
    elif case == "too short":
        write_tokens(path, list(range(CTX)), VOCAB)
    elif case == "id >= vocab":
        _patch(path, 32 + 2 * 123, struct.pack("<H", VOCAB + 7))
    elif case == "larger vocab":
        return VOCAB // 2
    elif case == "missing":
        path.unlink()
    return VOCAB


@pytest.mark.parametrize(
    "case, message",
    [
        ("bad magic", "not a token file"),
        ("version", "unsupported version 7"),
        ("itemsize", "unsupported itemsize 3"),
        ("truncated", "truncated"),
        ("trailing", "trailing bytes"),
        ("header only", "too short for a token file"),
        ("empty", "empty token file"),
        ("too short", "fewer than context_length"),
        ("id >= vocab", f"token id {VOCAB + 7} >= vocab_size {VOCAB}.*position 123"),
        ("larger vocab", "written for vocab_size 1000"),
        ("missing", "not found"),
    ],
)
def test_validate_rejects_corruption(token_file, case, message):
    vocab = _corrupt(token_file, case)
    with pytest.raises(DataError, match=message) as err:
        validate_token_file(token_file, vocab, CTX)
    assert str(token_file) in str(err.value), "the error must name the file"
    with pytest.raises(DataError):
        TokenLoader(token_file, CTX, vocab)


def test_validate_scans_every_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "SCAN_CHUNK", 64)
    path = tmp_path / "t.bin"
    write_tokens(path, [1] * 1000, VOCAB)
    _patch(path, 32 + 2 * 999, struct.pack("<H", VOCAB))  # in the last chunk
    with pytest.raises(DataError, match="position 999"):
        validate_token_file(path, VOCAB, CTX)


# ----------------------------------------------------------------------- loader


def test_batches_are_deterministic_slices(token_file):
    loader = TokenLoader(token_file, CTX, VOCAB)
    a = loader.batch(seed=3, step=10, batch_size=8)
    assert a.dtype == np.int32 and a.shape == (8, CTX + 1) and type(a) is np.ndarray
    np.testing.assert_array_equal(
        a, TokenLoader(token_file, CTX, VOCAB).batch(3, 10, 8)
    )
    assert not np.array_equal(a, loader.batch(3, 11, 8)), "steps must differ"
    assert not np.array_equal(a, loader.batch(4, 10, 8)), "seeds must differ"
    # Token i of the file is i: each row is a real window (x[1:] follows x).
    np.testing.assert_array_equal(a, a[:, :1] + np.arange(CTX + 1))
    starts = np.concatenate([loader.batch(0, s, 64)[:, 0] for s in range(20)])
    assert starts.min() >= 0 and starts.max() <= loader.n_tokens - CTX - 1
    assert starts.max() > loader.n_tokens - 3 * CTX, "the file end is reachable"


def test_val_batches_cover_non_overlapping_windows(token_file):
    loader = TokenLoader(token_file, CTX, VOCAB)
    n = loader.num_val_windows()
    assert n == (500 - 1) // CTX
    batches = list(loader.val_batches(batch_size=5))
    assert [len(b) for b in batches] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    rows = np.concatenate(batches)
    np.testing.assert_array_equal(rows[:, 0], np.arange(n) * CTX)
    np.testing.assert_array_equal(rows, rows[:, :1] + np.arange(CTX + 1))
    again = np.concatenate(list(loader.val_batches(batch_size=3)))
    np.testing.assert_array_equal(rows, again)
    assert loader.num_val_windows(max_tokens=CTX * 2 + 1) == 3  # enough to cover
    assert loader.num_val_windows(max_tokens=10**9) == n
    assert sum(len(b) for b in loader.val_batches(4, max_tokens=CTX * 5)) == 5


def test_resume_continues_the_same_stream(token_file):
    """A restarted run (a new loader) from step k reads exactly the batches the
    uninterrupted run read from step k on: the cursor is (seed, step)."""
    first = TokenLoader(token_file, CTX, VOCAB)
    straight = [first.batch(7, step, 4) for step in range(12)]
    del first
    again = TokenLoader(token_file, CTX, VOCAB)
    resumed = [again.batch(7, step, 4) for step in range(5, 12)]
    for a, b in zip(straight[5:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def _rss_file_bytes() -> int:
    """Resident file-backed memory (memory-mapped pages) of this process."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_rss_does_not_grow_with_batches(tmp_path):
    # 16M uint16 tokens = 32 MiB; 600 batches of 64 random windows touch most of
    # its pages, which a long-lived memmap would keep resident.
    path = tmp_path / "big.bin"
    write_tokens(path, np.arange(16 * 2**20, dtype=np.uint32) % VOCAB, VOCAB)
    loader = TokenLoader(path, CTX, VOCAB)
    before = _rss_file_bytes()
    for step in range(600):
        loader.batch(0, step, 64)
    grown = (_rss_file_bytes() - before) / 2**20
    assert grown < 8, f"RSS grew by {grown:.1f} MiB over 600 batches"


def _sidecar(path: Path, n_tokens: int, sha: str = "a" * 64) -> Path:
    meta = {
        "tokenizer": {"sha256": sha, "vocab_size": VOCAB},
        "splits": {"train": {"file": path.name, "n_tokens": n_tokens}},
    }
    (path.parent / "meta.json").write_text(json.dumps(meta))
    return path.parent / "meta.json"


def test_sidecar_is_checked(token_file):
    _sidecar(token_file, 500)
    assert TokenLoader(token_file, CTX, VOCAB, tokenizer_sha256="a" * 64).meta
    assert TokenLoader(token_file, CTX, VOCAB).meta["n_tokens"] == 500
    with pytest.raises(DataError, match="made with tokenizer sha256 aaaa") as err:
        TokenLoader(token_file, CTX, VOCAB, tokenizer_sha256="b" * 64)
    assert str(token_file) in str(err.value)
    _sidecar(token_file, 499)
    with pytest.raises(DataError, match="header holds 500 tokens but .* says 499"):
        TokenLoader(token_file, CTX, VOCAB)
    (token_file.parent / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json: damaged"):
        TokenLoader(token_file, CTX, VOCAB)
    (token_file.parent / "meta.json").write_text('{"other": "tool"}')
    assert TokenLoader(token_file, CTX, VOCAB).meta is None


# ---------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def stories(corpus) -> list[str]:
    text = corpus.read_text(encoding="utf-8")
    return [s.strip() for s in text.split("<|endoftext|>\n") if s.strip()]


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus], out, vocab_size=512)
    return out


def write_corpus(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(f"{d}\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    return path


def split_docs(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    assert tokens[-1] == eos, "every document ends with EOS"
    cuts = np.flatnonzero(tokens == eos)[:-1] + 1
    return [tuple(d.tolist()) for d in np.split(np.asarray(tokens), cuts)]


def prepare(capsys, *argv) -> tuple[int, str]:
    code = D.main(["prepare", *map(str, argv)])
    return code, capsys.readouterr().err


def test_prepare_writes_documents_with_eos(capsys, tmp_path, stories, tok_dir):
    corpus = write_corpus(tmp_path / "c.txt", stories[:120] + stories[:5] + ["  ", ""])
    out = tmp_path / "out"
    code, err = prepare(
        capsys, "--input", corpus, "--tokenizer", tok_dir, "--output", out
    )
    assert code == 0, err
    tok = Tokenizer.load(tok_dir)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["duplicates_dropped"] == 5
    assert meta["tokenizer"] == {
        "dir": str(tok_dir),
        "kind": "sentencepiece",
        "sha256": tok.sha256,
        "bos_id": 2,
        "eos_id": 3,
        "vocab_size": 512,
    }
    decoded = set()
    for split in ("train", "val"):
        tokens = T.open_tokens(out / f"{split}.bin")
        docs = split_docs(tokens, tok.eos_id)
        assert meta["splits"][split]["docs"] == len(docs) > 0
        assert meta["splits"][split]["n_tokens"] == len(tokens)
        decoded |= {tok.decode(d) for d in docs}
    assert decoded == set(stories[:120]), "each story exactly once, intact"
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "train.bin",
        "val.bin",
    ]


def test_split_ignores_input_order(capsys, tmp_path, stories, tok_dir):
    docs = stories[:150]
    shuffled = random.Random(1).sample(docs, len(docs))
    a1 = write_corpus(tmp_path / "a1.txt", docs[:70])
    a2 = write_corpus(tmp_path / "a2.txt", docs[70:])
    b1 = write_corpus(tmp_path / "b1.txt", shuffled[:30])
    b2 = write_corpus(tmp_path / "b2.txt", shuffled[30:])
    tokdir = ["--tokenizer", tok_dir]
    assert (
        prepare(capsys, "--input", a1, a2, *tokdir, "--output", tmp_path / "a")[0] == 0
    )
    assert (
        prepare(capsys, "--input", b2, b1, *tokdir, "--output", tmp_path / "b")[0] == 0
    )
    for split in ("train", "val"):
        a, b = (T.open_tokens(tmp_path / r / f"{split}.bin") for r in "ab")
        assert sorted(split_docs(a, 3)) == sorted(split_docs(b, 3)), split


@pytest.mark.parametrize(
    "delimiter, text, n_docs",
    [
        ("blank", "one\ntwo\n\n\nthree\n  \nfour four\n", 3),
        ("none", "whole\n\nfile\n<|endoftext|>\nstill\n", 1),
        ("###", "a b\n###\nc d\n ### \ne f\n", 3),
    ],
)
def test_delimiters(tmp_path, tok_dir, delimiter, text, n_docs):
    corpus = tmp_path / "c.txt"
    corpus.write_text(text)
    docs = [d for d, _ in CT.iter_documents(corpus, delimiter) if d]
    assert len(docs) == n_docs
    assert sum(n for _, n in CT.iter_documents(corpus, delimiter)) == len(text)


@pytest.mark.parametrize(
    "case, message",
    [
        ("tiny", "validation split is empty"),
        ("missing", "no such file"),
        ("no tokenizer", "no tokenizer"),
        ("binary", "binary file"),
        ("val fraction", "--val-fraction"),
    ],
)
def test_prepare_errors_exit_2(capsys, tmp_path, stories, tok_dir, case, message):
    corpus = write_corpus(tmp_path / "c.txt", stories[:2])
    tokdir = tmp_path / "none" if case == "no tokenizer" else tok_dir
    extra = ["--val-fraction", "1.5"] if case == "val fraction" else []
    if case == "missing":
        corpus = tmp_path / "missing.txt"
    if case == "binary":
        corpus.write_bytes(b"\x00\x01\x02" * 100)
    out = tmp_path / "out"
    code, err = prepare(
        capsys, "--input", corpus, "--tokenizer", tokdir, "--output", out, *extra
    )
    assert code == 2 and "error:" in err and message in err, err
    assert "Traceback" not in err
    assert not (out / "train.bin").exists() and not (out / "val.bin").exists()


def test_max_docs(capsys, tmp_path, stories, tok_dir):
    corpus = write_corpus(tmp_path / "c.txt", stories[:100])
    out = tmp_path / "out"
    argv = ["--input", corpus, "--tokenizer", tok_dir, "--output", out]
    assert prepare(capsys, *argv, "--max-docs", "40")[0] == 0
    splits = json.loads((out / "meta.json").read_text())["splits"]
    assert splits["train"]["docs"] + splits["val"]["docs"] == 40


def reference_documents(text: str, delimiter: str) -> list[str]:
    """The slow, obvious reading of the delimiter rules, line by line."""
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").split("\n")
    docs, current = [], []
    for line in lines:
        s = line.strip()
        if (
            delimiter == "blank"
            and not s
            or delimiter not in ("blank", "none")
            and (s == delimiter)
        ):
            docs.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current).strip())
    if delimiter == "blank":
        return [d for d in docs if d]
    while docs and not docs[-1]:  # nothing after the last delimiter is no document
        docs.pop()
    return docs


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
def test_documents_match_the_line_by_line_reference(tmp_path, chunk, monkeypatch):
    monkeypatch.setattr(CT.iter_text_chunks, "__defaults__", (chunk,))
    rng = random.Random(chunk)
    pieces = ["a b", "###", " ### ", "", "  ", "c\r", "\ufeffd", "x###", "é ü 😀"]
    for i in range(300):
        text = "\n".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        text += rng.choice(["", "\n", "\r\n"])
        path = tmp_path / f"{i}.txt"
        path.write_bytes(text.encode())
        for delimiter in ("###", "blank", "none"):
            got = list(CT.iter_documents(path, delimiter))
            docs = [d for d, _ in got if d or delimiter != "blank"]
            while docs and not docs[-1]:  # a trailing "" may carry the last bytes
                docs.pop()
            assert docs == reference_documents(text, delimiter), (delimiter, text)
            assert sum(n for _, n in got) == len(text.encode()), repr(text)


# ---------------------------------------------------------------- corpus finding


def test_expand_inputs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.txt", "sub/c.txt", "skip.md"):
        (tmp_path / name).write_text("x\n")
    found = C.expand_inputs([tmp_path, tmp_path / "a.txt", str(tmp_path / "*.txt")])
    assert found == [tmp_path / n for n in ("a.txt", "b.txt", "sub/c.txt")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        C.expand_inputs([tmp_path / "empty"])
    with pytest.raises(DataError, match="no files match"):
        C.expand_inputs([str(tmp_path / "*.json")])
    with pytest.raises(DataError, match="no input files"):
        C.expand_inputs([])


def test_find_corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "repo" / "src" / "corpus" / "sources.py"
    monkeypatch.setattr(C, "__file__", str(fake))
    with pytest.raises(DataError, match="--data PATH.*src.data download"):
        C.find_corpus()
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "TinyStories-valid.txt").write_text("x\n")
    assert C.find_corpus() == [Path("data/raw/TinyStories-valid.txt")]
    (raw / "tinystories_train.txt").write_text("x\n")
    assert C.find_corpus() == [Path("data/raw/tinystories_train.txt")]
    assert C.find_corpus(str(raw)) == sorted(raw.iterdir())
    with pytest.raises(DataError, match="no such file"):
        C.find_corpus("nope.txt")


# ------------------------------------------------------------ source protocol

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FLAGS = ("--input", "--hf-dataset", "--hf-config", "--hf-split", "--text-field")


def test_each_source_kind_says_what_it_is(tmp_path):
    docs = ["One story here.", "A second\nstory.", "Third."]
    (tmp_path / "a.txt").write_text("".join(f"{d}\n<|endoftext|>\n" for d in docs))
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs)
    )
    (tmp_path / "meta.json").write_text("{}")  # a folder skips .json files
    found = C.open_sources([tmp_path, tmp_path / "b.jsonl"])
    assert found == [C.TextFile(tmp_path / "a.txt"), C.RecordFile(tmp_path / "b.jsonl")]
    txt, rec = found
    assert not txt.records and rec.records
    for source in found:
        size = source.path.stat().st_size
        assert source.size == size and str(source) == str(source.path)
        assert source.describe() == {"path": str(source.path), "bytes": size}
    assert C.open_sources([str(tmp_path / "meta.json")]) == [
        C.RecordFile(tmp_path / "meta.json")
    ]
    hub = C.HubDataset("org/name", "cfg", "validation")
    assert hub.records and hub.size is None
    assert hub.describe() == {
        "hf_dataset": "org/name",
        "config": "cfg",
        "split": "validation",
    }
    assert str(hub) == "hub dataset org/name (cfg), split 'validation'"
    assert C.open_sources(hub=hub) == [hub]
    assert C.open_sources([hub, tmp_path / "a.txt", txt]) == [hub, txt]
    with pytest.raises(DataError, match="either input files or a hub dataset"):
        C.open_sources([tmp_path / "a.txt"], hub=hub)
    with pytest.raises(DataError, match="no input files"):
        C.open_sources([])
    with pytest.raises(DataError, match="not a .jsonl"):
        C.RecordFile(tmp_path / "a.txt")
    # The same stories read the same from either kind, as documents, as lines,
    # and as the tasks of prepare's workers.
    opts = C.ReadOptions()
    for source in found:
        assert [d for d, _ in source.documents(opts) if d] == docs, source
        lines = [x for x, _ in source.lines(opts) if x != "<|endoftext|>"]
        assert lines == "\n".join(docs).split("\n"), source
        tasks = list(source.tasks(opts, batch_docs=2, range_bytes=10))
        assert len(tasks) > 1
        got = [d for t in tasks for d in C.task_documents(t) if d]
        assert got == docs, source
    assert all(isinstance(t, CT.TextRange) for t in txt.tasks(opts, 2, 10))
    assert [len(t) for t in rec.tasks(opts, 2, 10)] == [2, 1]
    assert sum(n for _, n in txt.documents(opts)) == txt.size
    assert sum(n for _, n in txt.lines(opts)) == txt.size
    assert [x for x, _ in rec.lines(opts, max_docs=1)] == [docs[0]]


def test_a_hub_source_is_opened_only_when_read(monkeypatch):
    """Building the parsers, reading the flags and describing a hub source touch
    no network: `datasets.load_dataset` runs only once its rows are read."""
    from src.tokenizer import cli as tokenizer_cli

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return iter([{"text": " hub text "}])

    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset)
    )
    hub = ["--hf-dataset", "org/name", "--hf-config", "cfg", "--hf-split", "test"]
    argvs = [
        ["prepare", *hub, "--tokenizer", "t", "--output", "o"],
        ["train", *hub, "--output", "o", "--vocab-size", "512"],
    ]
    for parser, argv in zip((D, tokenizer_cli), argvs, strict=True):
        args = parser.build_parser().parse_args(argv)
        (source,) = C.sources_from_args(args)
        assert source == C.HubDataset("org/name", "cfg", "test")
        assert source.records and source.size is None
        assert source.describe()["hf_dataset"] == "org/name" and str(source)
        opts = C.ReadOptions()
        source.documents(opts), source.lines(opts), source.tasks(opts, 8, 8)
    assert calls == []
    assert list(source.documents(C.ReadOptions())) == [("hub text", 0)]
    assert calls == [(("org/name", "cfg"), {"split": "test", "streaming": True})]


def test_data_and_tokenizer_clis_share_the_source_flags(capsys):
    from src import cli
    from src.tokenizer import cli as tokenizer_cli

    flags = ["--input", "a.txt", "b/", "--hf-split", "s", "--text-field", "story"]
    data = D.build_parser().parse_args(
        ["prepare", *flags, "--tokenizer", "t", "--output", "o"]
    )
    tok = tokenizer_cli.build_parser().parse_args(
        ["train", *flags, "--output", "o", "--vocab-size", "512"]
    )
    keys = [f.lstrip("-").replace("-", "_") for f in SOURCE_FLAGS]
    assert [getattr(data, k) for k in keys] == [getattr(tok, k) for k in keys]
    assert data.input == ["a.txt", "b/"] and data.hf_config is None
    # Defaults: the data CLI's --text-field depends on --chat; the tokenizer's is
    # "text".
    data = D.build_parser().parse_args(
        ["prepare", "--input", "a", "--tokenizer", "t", "--output", "o"]
    )
    tok = tokenizer_cli.build_parser().parse_args(
        ["train", "--input", "a", "--output", "o", "--vocab-size", "512"]
    )
    assert data.text_field is None and tok.text_field == "text"
    assert data.hf_split == tok.hf_split == "train"
    for parser, extra in (
        (D.build_parser(), ["prepare", "--tokenizer", "t", "--output", "o"]),
        (tokenizer_cli.build_parser(), ["train", "--output", "o", "--vocab-size", "9"]),
    ):
        both = [*extra, "--input", "a", "--hf-dataset", "x/y"]
        assert cli.parse(parser, both) == 2
        assert "not allowed with argument" in capsys.readouterr().err
        assert cli.parse(parser, extra) == 2
        assert "one of the arguments --input --hf-dataset" in capsys.readouterr().err
        assert cli.parse(parser, [extra[0], "--help"]) == 0
        usage = capsys.readouterr().out
        assert all(flag in usage for flag in SOURCE_FLAGS), usage


@pytest.mark.parametrize("module", ["src.data", "src.tokenizer"])
def test_hf_config_without_hf_dataset_exits_2(tmp_path, module):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Once upon a time.\n<|endoftext|>\n")
    out = tmp_path / "out"
    if module == "src.data":
        rest = ["prepare", "--tokenizer", str(tmp_path / "tok")]
    else:
        rest = ["train", "--vocab-size", "512"]
    argv = [*rest, "--input", str(corpus), "--hf-config", "c", "--output", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: --hf-config needs --hf-dataset" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_download_with_a_fake_hub(tmp_path, monkeypatch, capsys):
    rows = [{"text": "First story.\n"}, {"text": "  "}, {"text": "Second."}]
    fake = types.SimpleNamespace(load_dataset=lambda *a, **k: iter(rows))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    out = tmp_path / "raw" / "ts.txt"
    assert D.main(["download", "--output", str(out)]) == 0
    assert out.read_text() == "First story.\n<|endoftext|>\nSecond.\n<|endoftext|>\n"

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline)
    )
    assert D.main(["download", "--output", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err
    assert "error: could not download" in err and "Couldn't reach" in err
    assert not (tmp_path / "x.txt").exists()


def test_no_framework_imports():
    code = (
        "import sys, src.data.cli, src.tokenizer.spm; "
        "bad = {'mlx', 'torch'} & {m.split('.')[0] for m in sys.modules}; "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1]
    )
