"""scripts/speedrun.sh end to end, shrunk: tiny model, 250 KB of text, a budget of
seconds; with the nanoGPT-style baseline and the report that scores both."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def test_speedrun_with_baseline_and_report(tiny_corpus, tmp_path):
    pytest.importorskip("torch")
    if not (SHARED_DATA / "tinystories_valid.txt").exists():
        pytest.skip("../shared/data not found")
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["run_name"] = "sr"
    cfg["data"] = {
        "train_path": str(tmp_path / "data" / "train.bin"),
        "val_path": str(tmp_path / "data" / "val.bin"),
        "tokenizer_path": str(tmp_path / "tokenizer"),
    }
    cfg["checkpoint"] = {"dir": str(tmp_path / "ck"), "interval": 0}
    cfg["logging"] = {"dir": str(tmp_path / "logs"), "progress_bar": False}
    config = tmp_path / "sr.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "SPEEDRUN_EVAL_RESERVE_S": "5"}
    proc = subprocess.run(
        ["bash", "scripts/speedrun.sh", "--skip-setup", "--minutes", "0.4",
         "--config", str(config), "--data", str(tiny_corpus), "--baseline"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "speedrun: " in proc.stdout and "s of the 24s budget" in proc.stdout

    result = json.loads((tmp_path / "logs" / "sr" / "speedrun.json").read_text())
    sets = {row["set"]: row for row in result["eval"]}
    assert {"TinyStories valid", "WikiText-2 test", "Gutenberg"} <= set(sets)
    for row in sets.values():
        for key in ("ours_bpb", "baseline_bpb"):
            assert math.isfinite(row[key]) and 0.5 < row[key] < 8, row
    # trained: better than a uniform guess over the 512 tokens (9 bits/token)
    valid = sets["TinyStories valid"]
    assert valid["ours_bpb"] < 9 * valid["tokens"] / valid["bytes"], valid
    assert result["baseline"]["steps"] > 1
    assert len(result["samples"]) == 5
    md = (tmp_path / "logs" / "sr" / "speedrun.md").read_text()
    assert "| TinyStories valid |" in md and "baseline (bits/byte)" in md
