"""scripts/benchmark.py end to end through its command line on the tiny shape:
our step, PyTorch and mlx-lm workers start from the same weights and batch, take
turns and are reported (JSON and markdown)."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_workers_agree_take_turns_and_report(tmp_path):
    impls = ["ours", "torch", "mlx_lm"]
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--shapes", "tiny", "--impls", *impls,
         "--rounds", "2", "--warmup", "1", "--compile-timeout", "120",
         "--out", str(tmp_path / "bench")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "bench.json").read_text())["tiny"]
    rows = res["results"]
    assert list(rows) == impls
    for impl in impls:
        assert rows[impl]["n"] == 2 and rows[impl]["tok_s"] > 0, rows[impl]
        assert rows[impl]["rss_peak"] > 0
    losses = [rows[k]["loss1"] for k in impls]  # same weights, same batch
    assert max(losses) - min(losses) < 1e-4, losses
    assert abs(losses[0] - math.log(256)) < 0.5  # a fresh model guesses uniformly
    assert rows["ours"]["mlx_peak"] > 0 and rows["torch"]["mlx_peak"] is None
    assert set(res["gemm_gflops"]) == {"mlx", "torch"}
    assert all(v > 0 for v in res["gemm_gflops"].values())
    assert res["ratios"]["ours/torch"] == rows["ours"]["tok_s"] / rows["torch"]["tok_s"]
    md = (tmp_path / "bench.md").read_text()
    assert "| mlx_lm |" in md and "ours/mlx_lm" in md


def test_unknown_shape_is_a_usage_error():
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--shapes", "huge"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
