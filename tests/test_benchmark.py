"""The training-step benchmark (scripts/benchmark.py) end to end on a tiny shape:
our step, PyTorch and mlx-lm workers start from the same weights and batch, take
turns and are reported."""

import argparse
import math
import subprocess
import sys
from pathlib import Path

from src.bench import training as benchmark

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
            d_ff=128, context_length=32)  # fmt: skip


def test_workers_agree_take_turns_and_report(tmp_path):
    spec = {"model": TINY, "training": {"batch_size": 4}}
    args = argparse.Namespace(compile_timeout=120, warmup=1, rounds=2, steps=1)
    impls = ["ours", "torch", "mlx_lm"]
    res = benchmark.bench_shape(spec, impls, args, tmp_path)
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
    md = benchmark.table("t", "tiny", res)
    assert "| mlx_lm |" in md and "ours/mlx_lm" in md


def test_script_help():
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "--shapes" in proc.stdout, proc.stderr
