"""scripts/prepare_data.sh: tokenizer + token files for a dataset, from local text;
scripts/ablate.py: one training run per row, its numbers in the table."""

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


def test_ablate_script_prints_a_row_per_change(tmp_path, tiny_dataset):
    """scripts/ablate.py: each row is a real training run of the config with its
    changes; the table holds each run's final validation bits per byte."""
    import json
    import sys

    sets = [f"data.train_path={tiny_dataset['train']}",
            f"data.val_path={tiny_dataset['val']}",
            f"data.tokenizer_path={tiny_dataset['tokenizer']}",
            "eval.interval=3", "eval.max_tokens=512", "eval.sample_tokens=0",
            "checkpoint.interval=0",
            # a config's time budget does not replace --steps
            "training.time_budget_minutes=5"]  # fmt: skip
    cmd = [sys.executable, "scripts/ablate.py", "--config", "configs/tiny.yaml",
           "--steps", "3", "--no-default-rows", "--dir", str(tmp_path / "runs"),
           "--row", "base: ", "--row", "relu2: model.mlp=relu2",
           "--row", "bad: model.mlp=nope", "--out", str(tmp_path / "t.md"),
           *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [
        r for r in (tmp_path / "t.md").read_text().splitlines() if r.startswith("| ")
    ]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["base", "relu2", "bad"]
    for i, row in enumerate(rows[1:3]):
        log = tmp_path / "runs" / "logs" / f"ablate-{i:02d}" / "metrics.jsonl"
        evals = [json.loads(x) for x in log.read_text().splitlines() if "val_bpb" in x]
        assert f"| {evals[-1]['val_bpb']:.4f} | 3 |" in row
    assert "failed: error: " in rows[3] and "model.mlp='nope'" in rows[3]
