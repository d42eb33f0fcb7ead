"""scripts/gpu_check.sh, what a lent GPU machine runs (issue 18): its usage paths,
and that on a machine without a GPU its check stops at once, saying why. The
downloads of --prepare and the GPU run itself are not exercised here."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def check(*args, tmp_path=None, **env) -> subprocess.CompletedProcess:
    """`bash scripts/gpu_check.sh ARGS`, with this venv's python and, given
    tmp_path, every folder it writes to under tmp_path."""
    if tmp_path is not None:
        env = {
            "OUT": str(tmp_path / "out"),
            "GPU_CHECK_STORE": str(tmp_path / "store"),
            "GPU_CHECK_SITE": str(tmp_path / "site"),
            "GPU_CHECK_CARRY": "build/gpu_check_test_absent",
            **env,
        }
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**os.environ, "PYTHON": sys.executable, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_help_explains_the_two_calls():
    proc = check("--help")
    assert proc.returncode == 0, proc.stderr
    for words in ("--prepare", "--stage 1", "--stage 2", "--no-install", "64 MiB",
                  "$OUT"):  # fmt: skip
        assert words in proc.stdout, (words, proc.stdout)
    assert "set -euo" not in proc.stdout  # the comment block only


@pytest.mark.parametrize(
    "args, words",
    [
        (["--bogus"], "unknown argument '--bogus'"),
        ([], "--prepare, --stage 1 or --stage 2"),
        (["--stage", "3"], "--stage needs 1 or 2"),
        (["--stage"], "--stage needs 1 or 2"),
        (["--stage", "1", "--no-install"], "--no-install is for --stage 2"),
    ],
)
def test_usage_mistakes_exit_2_with_one_line(args, words, tmp_path):
    proc = check(*args, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"gpu_check: error: {lines[0].split('error: ', 1)[-1]}"]
    assert words in lines[0], proc.stderr


@pytest.mark.skipif(
    mx.default_device().type == mx.DeviceType.gpu, reason="this machine has a GPU"
)
def test_cpu_default_device_fails_before_anything_long(tmp_path):
    proc = check("--stage", "2", "--no-install", tmp_path=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "not a GPU" in proc.stderr and "Device(cpu" in proc.stderr, proc.stderr
    out = tmp_path / "out"
    assert "import mlx.core: ok" in (out / "imports.txt").read_text()
    assert "default device Device(cpu" in (out / "device.txt").read_text()
    # neither the tests nor the benchmark started
    assert not (out / "pytest.log").exists() and not (out / "benchmark.log").exists()
    assert not (tmp_path / "store").exists()  # --no-install stores nothing


@pytest.mark.parametrize("stage", ["1", "2"])
def test_a_call_that_carried_nothing_fails_and_says_so(stage, tmp_path):
    proc = check("--stage", stage, tmp_path=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stderr.startswith("gpu_check: FAIL: nothing carried in "), proc.stderr
    assert "carry list" in proc.stderr
    assert not (tmp_path / "site").exists()  # nothing installed, nothing run
    assert not (tmp_path / "out" / "pytest.log").exists()


def test_install_without_part_1_fails_and_says_so(tmp_path):
    """Call 2 after a machine that lost call 1's part (or the wrong Python)."""
    name = "mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl"
    (tmp_path / "carry" / "2").mkdir(parents=True)
    (tmp_path / "carry" / "2" / f"{name}.part-01").write_bytes(b"half a wheel")
    proc = check("--stage", "2", tmp_path=tmp_path,
                 GPU_CHECK_CARRY=str(tmp_path / "carry"))  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stderr.startswith("gpu_check: FAIL: "), proc.stderr
    # on CPython 3.12 the missing part is named; elsewhere the wrong Python
    assert "part 1 of the CUDA wheel" in proc.stderr or "CPython 3.12" in proc.stderr
    assert (tmp_path / "store" / f"{name}.part-01").exists()  # call 2 stored its part
    assert not (tmp_path / "site").exists()
