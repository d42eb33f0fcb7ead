"""scripts/prepare_data.sh: tokenizer + token files for a dataset, from local text."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prepare_data_script(tmp_path, tiny_corpus):
    env = dict(
        os.environ,
        DATA=str(tiny_corpus),
        DATASET="mytexts",
        VOCAB_SIZE="512",
        TOKENIZER=str(tmp_path / "tok"),
        OUT=str(tmp_path / "out"),
        PY=sys.executable,
    )
    proc = subprocess.run(
        ["bash", "scripts/prepare_data.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "tok" / "tokenizer.model").exists()
    assert '"n_tokens"' in proc.stdout  # the closing `stats`


def test_prepare_data_unknown_dataset_without_data(tmp_path):
    env = dict(
        os.environ,
        DATASET="nosuchset",
        PY=sys.executable,
        TOKENIZER=str(tmp_path / "tok"),
        OUT=str(tmp_path / "out"),
    )
    env.pop("DATA", None)
    proc = subprocess.run(
        ["bash", "scripts/prepare_data.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "set DATA=PATH" in proc.stderr
