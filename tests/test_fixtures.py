"""The shared fixtures themselves: the synthetic corpus the suite falls back on
without ../shared/data goes through the whole data pipeline, and the tiny config
factory gives valid configs."""

import subprocess
import sys
from pathlib import Path

import conftest
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_corpus_goes_through_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "absent")
    with pytest.warns(UserWarning, match="synthetic corpus"):  # never silent
        text, kind = conftest.story_text(60_000)
        again, _ = conftest.story_text(60_000)
    assert kind == "synthetic" and 50_000 < len(text) <= 60_000
    assert text.endswith("<|endoftext|>\n") and text.count("<|endoftext|>") > 100
    assert again == text  # the same text every time
    corpus = tmp_path / "c.txt"
    corpus.write_text(text, encoding="utf-8")
    for argv in (
        ["tokenizer", "train", "--input", corpus, "--output", tmp_path / "tok",
         "--vocab-size", "1000"],
        ["data", "prepare", "--input", corpus, "--tokenizer", tmp_path / "tok",
         "--output", tmp_path / "tokens"],
    ):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", f"src.{argv[0]}", *map(str, argv[1:])],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "tokens" / "val.bin").stat().st_size > 1000


def test_tiny_config_factory(tiny_config):
    cfg = tiny_config({"batch_size": 2}, d_model=48, n_heads=6)
    assert cfg.model.d_model == 48 and cfg.model.vocab_size == 97
    assert cfg.training.batch_size == 2
    assert tiny_config().model.context_length == conftest.TINY_MODEL["context_length"]
