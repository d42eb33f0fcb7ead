"""The import graph is part of the design (STYLE.md habit 2): framework-free data
code, and no torch (or mlx-lm, whose package import loads transformers and torch)
anywhere on the MLX training and generation path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(module: str) -> set[str]:
    code = (
        f"import sys, json, {module}; "
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    "module", ["src.config", "src.tokenizer.spm", "src.data.cli", "src.data.tokens"]
)
def test_data_side_imports_no_framework(module):
    loaded = loaded_after(module)
    assert not loaded & {"mlx", "torch", "mlx_lm", "transformers"}, module


@pytest.mark.parametrize(
    "module", ["src.train.trainer", "src.inference.cli", "src.inference.chat", "src.eval.cli"]
)
def test_mlx_path_imports_no_torch(module):
    loaded = loaded_after(module)
    assert "mlx" in loaded
    assert not loaded & {"torch", "mlx_lm", "transformers"}, module
