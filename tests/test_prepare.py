"""`prepare` from every source kind (txt, jsonl, parquet, a hub dataset streamed
through `datasets` from local files), the quality filters, --max-tokens, BOS/EOS,
and the `split` and `stats` subcommands. Nothing here touches the network."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from src.data import cli as D
from src.data import tokens as T
from src.data.documents import QualityFilter, repetition
from src.data.loader import TokenLoader
from src.tokenizer.spm import Tokenizer

EOS, BOS = 3, 2


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(f"{d}\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    rows = (json.dumps({"id": i, field: d}) for i, d in enumerate(docs))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": docs, "n": list(range(len(docs)))})
    pq.write_table(table, path, row_group_size=16)  # several row groups
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = D.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def prepare(capsys, inputs, tok_dir, out, *extra) -> tuple[int, str]:
    """inputs: a list of paths for --input, or a tuple of raw arguments."""
    ins = ["--input", *inputs] if isinstance(inputs, list) else list(inputs)
    code, _, err = run(
        capsys, "prepare", *ins, "--tokenizer", tok_dir, "--output", out, *extra
    )
    return code, err


def docs_of(tokens: np.ndarray) -> list[tuple[int, ...]]:
    assert len(tokens) and tokens[-1] == EOS, "every document ends with EOS"
    cuts = np.flatnonzero(tokens == EOS)[:-1] + 1
    return [tuple(d.tolist()) for d in np.split(np.asarray(tokens), cuts)]


def test_txt_jsonl_parquet_give_identical_token_files(
    capsys, tmp_path, stories, tok_dir
):
    docs = stories[:60]
    sources = {
        "txt": write_txt(tmp_path / "c.txt", docs),
        "jsonl": write_jsonl(tmp_path / "c.jsonl", docs),
        "parquet": write_parquet(tmp_path / "c.parquet", docs),
    }
    for kind, path in sources.items():
        code, err = prepare(capsys, [path], tok_dir, tmp_path / kind)
        assert code == 0, err
    for split in ("train", "val"):
        ref = (tmp_path / "txt" / f"{split}.bin").read_bytes()
        for kind in ("jsonl", "parquet"):
            assert (tmp_path / kind / f"{split}.bin").read_bytes() == ref, kind
    tok = Tokenizer.load(tok_dir)
    got = set()
    for split in ("train", "val"):
        got |= {
            tok.decode(d)
            for d in docs_of(T.open_tokens(tmp_path / "parquet" / f"{split}.bin"))
        }
    assert got == set(docs)
    meta = json.loads((tmp_path / "jsonl" / "meta.json").read_text())
    assert meta["inputs"] == [
        {"path": str(sources["jsonl"]), "bytes": sources["jsonl"].stat().st_size}
    ]
    assert meta["text_field"] == "text" and meta["tokenizer"]["sha256"] == tok.sha256


def test_folder_of_mixed_files_and_text_field(capsys, tmp_path, stories, tok_dir):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    write_txt(folder / "a.txt", stories[:20])
    write_jsonl(folder / "sub" / "b.jsonl", stories[20:40], field="story")
    (folder / "notes.md").write_text("ignored")
    code, err = prepare(
        capsys, [folder], tok_dir, tmp_path / "o", "--text-field", "story"
    )
    assert code == 0, err
    splits = json.loads((tmp_path / "o" / "meta.json").read_text())["splits"]
    assert splits["train"]["docs"] + splits["val"]["docs"] == 40


def test_hub_dataset_streams_through_datasets(
    capsys, tmp_path, stories, tok_dir, monkeypatch
):
    import datasets

    real = datasets.load_dataset
    parquet = write_parquet(tmp_path / "hub.parquet", stories[:50])
    calls = []

    def fake_hub(name, config=None, split=None, streaming=False, **kw):
        calls.append((name, config, split, streaming))
        # The same streaming reader the hub uses, on a local file.
        return real("parquet", data_files=[str(parquet)], split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    argv = ["--hf-dataset", "HuggingFaceFW/fineweb-edu", "--hf-config", "sample-10BT"]
    code, err = prepare(
        capsys, tuple(argv), tok_dir, tmp_path / "hub", "--max-docs", "30"
    )
    assert code == 0, err
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    meta = json.loads((tmp_path / "hub" / "meta.json").read_text())
    assert meta["inputs"] == [
        {
            "hf_dataset": "HuggingFaceFW/fineweb-edu",
            "config": "sample-10BT",
            "split": "train",
        }
    ]
    assert sum(s["docs"] for s in meta["splits"].values()) == 30

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'x/y' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code, err = prepare(capsys, ("--hf-dataset", "x/y"), tok_dir, tmp_path / "off")
    assert code == 2 and "error: hub dataset x/y" in err and "Couldn't reach" in err
    assert "Traceback" not in err and not (tmp_path / "off" / "train.bin").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no field", r"row 0 has no field 'text' \(fields: body, id\).*--text-field"),
        ("bad json", "cannot read it"),
        ("not text", "field 'text' is a int"),
        ("bad parquet", "cannot read it"),
        ("both sources", "not allowed with argument"),
    ],
)
def test_record_errors_exit_2(capsys, tmp_path, tok_dir, stories, case, message):
    path = tmp_path / ("c.parquet" if "parquet" in case else "c.jsonl")
    if case == "no field":
        write_jsonl(path, stories[:5], field="body")
    elif case == "bad json":
        write_jsonl(path, stories[:5])
        with open(path, "a") as f:
            f.write("{not json\n")
    elif case == "not text":
        path.write_text('{"text": 5}\n')
    else:
        path.write_bytes(b"PAR1 damaged")
    extra = ["--hf-dataset", "x/y"] if case == "both sources" else []
    code, err = prepare(capsys, [path], tok_dir, tmp_path / "o", *extra)
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err
    if case != "both sources":
        assert str(path) in err, "the message must name the file"
    assert not (tmp_path / "o" / "train.bin").exists()


# -------------------------------------------------------------------- filters


def test_repetition_score():
    assert repetition("ha ha ha ha") == 1.0
    assert repetition("a line\nanother\na line\nanother") == pytest.approx(0.5)
    assert repetition("Once upon a time there was a cat. It sat on a mat.") < 0.1
    assert repetition("") == 0.0 and repetition("two words") == 0.0
    f = QualityFilter(min_words=3, max_repetition=0.3)
    assert f.reason("") == "empty"
    assert f.reason("too short") == "too_short"
    assert f.reason("buy now buy now buy now buy now") == "repetitive"
    assert f.reason("a normal sentence of words") is None
    assert QualityFilter(0, 1.0).reason("x x x x x") is None


def test_filters_drop_and_count(capsys, tmp_path, stories, tok_dir):
    junk = ["The end.", "ok", "spam spam spam spam spam spam spam spam"]
    junk.append("\n".join(["Click here to subscribe now!"] * 6))
    corpus = write_txt(tmp_path / "c.txt", stories[:40] + junk + stories[:3] + [" "])
    code, err = prepare(capsys, [corpus], tok_dir, tmp_path / "o")
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["dropped"] == {
        "empty": 1,
        "too_short": 2,
        "repetitive": 2,
        "duplicate": 3,
    }
    assert sum(s["docs"] for s in meta["splits"].values()) == 40
    assert meta["filters"] == {"min_words": 5, "max_repetition": 0.3}
    off = ["--min-words", "0", "--max-repetition", "1"]
    assert prepare(capsys, [corpus], tok_dir, tmp_path / "p", *off)[0] == 0
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert sum(s["docs"] for s in meta["splits"].values()) == 44


def test_max_tokens_keeps_whole_documents(capsys, tmp_path, stories, tok_dir):
    corpus = write_txt(tmp_path / "c.txt", stories[:80])
    code, err = prepare(
        capsys, [corpus], tok_dir, tmp_path / "o", "--max-tokens", "3000"
    )
    assert code == 0, err
    tokens = [T.open_tokens(tmp_path / "o" / f"{s}.bin") for s in ("train", "val")]
    n, longest = sum(map(len, tokens)), max(len(d) for t in tokens for d in docs_of(t))
    assert 3000 <= n < 3000 + longest


def test_bos_and_eos_per_document(capsys, tmp_path, stories, tok_dir):
    corpus = write_txt(tmp_path / "c.txt", stories[:40])
    assert prepare(capsys, [corpus], tok_dir, tmp_path / "o", "--bos")[0] == 0
    tok = Tokenizer.load(tok_dir)
    for s in ("train", "val"):
        for d in docs_of(T.open_tokens(tmp_path / "o" / f"{s}.bin")):
            assert d[0] == BOS and BOS not in d[1:] and EOS not in d[:-1]
            assert tok.decode(d) in stories


# --------------------------------------------------------------- split, stats


@pytest.fixture
def prepared(capsys, tmp_path, stories, tok_dir) -> Path:
    corpus = write_txt(tmp_path / "c.txt", stories[:80])
    assert prepare(capsys, [corpus], tok_dir, tmp_path / "o")[0] == 0
    return tmp_path / "o"


def test_split_by_index_at_a_document_boundary(capsys, tmp_path, prepared, tok_dir):
    src = prepared / "train.bin"
    whole = np.asarray(T.open_tokens(src))
    code, out, err = run(
        capsys,
        "split",
        "--input",
        src,
        "--output",
        tmp_path / "s",
        "--val-fraction",
        "0.25",
    )
    assert code == 0, err
    a, b = (
        np.asarray(T.open_tokens(tmp_path / "s" / f"{s}.bin")) for s in ("train", "val")
    )
    np.testing.assert_array_equal(np.concatenate([a, b]), whole)
    assert a[-1] == EOS and b[-1] == EOS, "no document straddles the cut"
    assert len(b) <= round(0.25 * len(whole))
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["tokenizer"]["sha256"] == Tokenizer.load(tok_dir).sha256
    TokenLoader(tmp_path / "s" / "val.bin", 8, 400)  # the sidecar checks out
    code, _, err = run(
        capsys,
        "split",
        "--input",
        src,
        "--output",
        tmp_path / "e",
        "--val-tokens",
        "101",
        "--exact",
    )
    assert code == 0, err
    assert T.read_header(tmp_path / "e" / "val.bin").n_tokens == 101


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--val-tokens", "10000000"], "cannot take"),
        (["--val-tokens", "5", "--eos-id", "399"], "no document boundary"),
        (["--val-tokens", "5", "--val-fraction", "0.1"], "not allowed with"),
        (["--val-fraction", "2"], "expected a number in"),
    ],
)
def test_split_errors_exit_2(capsys, tmp_path, prepared, argv, message):
    code, _, err = run(
        capsys,
        "split",
        "--input",
        prepared / "train.bin",
        "--output",
        tmp_path / "s",
        *argv,
    )
    assert code == 2 and message in err and "Traceback" not in err, err
    code, _, err = run(
        capsys,
        "split",
        "--input",
        prepared / "train.bin",
        "--output",
        prepared,
        "--val-tokens",
        "5",
    )
    assert code == 2 and "would be overwritten" in err


def test_stats(capsys, prepared):
    code, out, err = run(capsys, "stats", prepared)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    meta = json.loads((prepared / "meta.json").read_text())["splits"]
    assert [r["file"] for r in rows] == [
        str(prepared / "train.bin"),
        str(prepared / "val.bin"),
    ]
    for r, s in zip(rows, ("train", "val"), strict=True):
        assert r["docs"] == meta[s]["docs"] and r["n_tokens"] == meta[s]["n_tokens"]
        assert r["itemsize"] == 2 and r["vocab_size"] == 400 and r["max_id"] < 400
    code, _, err = run(capsys, "stats", prepared / "nope.bin")
    assert code == 2 and "not found" in err


def test_help_exits_0(capsys):
    for cmd in ("prepare", "split", "stats"):
        assert run(capsys, cmd, "--help")[0] == 0
    assert "jsonl" in sys.modules["src.data.cli"].PREPARE_DESCRIPTION
