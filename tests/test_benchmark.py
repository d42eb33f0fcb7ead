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
    machine = json.loads((tmp_path / "bench.json").read_text())["machine"]
    assert machine["gemm_gflops"] == res["gemm_gflops"]  # one shape: its ceiling
    first, table_head = md.splitlines()[0], md.split("**(tiny)")[1].splitlines()[0]
    assert machine["cpu_model"] in first and machine["cpu_model"] in table_head
    assert f"Machine: {machine['cpu_model']}" in md


def test_unknown_shape_is_a_usage_error():
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--shapes", "huge"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


# ------------------------------------------------ the machine the numbers are from

X86_CPUINFO = """processor	: {n}
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
physical id	: {socket}
core id		: {core}
flags		: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
ARM_CPUINFO = """processor	: {n}
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes sha1 sha2 crc32 atomics asimdrdm sve bf16 i8mm sve2
CPU implementer	: 0x41
CPU part	: 0xd4f
"""


def test_cpuinfo_parsing_counts_cores_and_keeps_the_flags_that_matter():
    from src.backend.machine import linux_cpu

    # 2 sockets x 2 cores x 2 hyperthreads: 8 logical CPUs, 4 physical cores
    blocks = [
        X86_CPUINFO.format(n=n, socket=n // 4, core=(n // 2) % 2) for n in range(8)
    ]
    cpu = linux_cpu("\n".join(blocks))
    assert cpu["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu["physical_cores"] == 4
    assert cpu["isa"] == ["avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                          "amx_tile", "amx_bf16", "amx_int8"]  # fmt: skip
    arm = linux_cpu("\n".join(ARM_CPUINFO.format(n=n) for n in range(4)))
    assert arm["isa"] == ["neon", "sve", "sve2", "bf16", "i8mm"]
    assert "0x41" in arm["cpu_model"]  # no model name: the implementer and part
    assert arm["physical_cores"] is None or arm["physical_cores"] >= 1  # from /sys


def test_machine_description_of_this_machine():
    import importlib.metadata
    import platform

    from src.backend import blas, machine

    m = machine.describe()
    assert isinstance(m["cpu_model"], str) and m["cpu_model"].strip()
    assert 1 <= m["physical_cores"] <= m["logical_cores"]
    assert 1 <= m["usable_cores"] <= m["logical_cores"]
    assert isinstance(m["isa"], list) and all(isinstance(f, str) for f in m["isa"])
    flags = Path("/proc/cpuinfo").read_text().split()
    if platform.machine() == "x86_64":
        assert ("avx2" in m["isa"]) == ("avx2" in flags)
    assert m["blas"]["name"]
    if blas.STATUS.optimized and "openblas" in blas.STATUS.path:
        assert m["blas"]["name"].startswith("OpenBLAS")
        assert m["blas"]["core"]  # the kernel set OpenBLAS picked for this CPU
    assert m["mlx"] == {"version": importlib.metadata.version("mlx"), "backend": "cpu"}
    json.dumps(m)  # goes into out/benchmark.json as it is
    line = machine.summary(m | {"gemm_gflops": {"mlx": 123.4}})
    assert m["cpu_model"] in line and "mlx 123 GFLOP/s" in line
    assert machine.short(m).startswith(m["cpu_model"])


def test_machine_module_imports_no_mlx():
    code = "import sys, src.backend.machine; print('mlx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "False"


# ------------------------------------------------ --breakdown


def test_breakdown_times_every_component_for_ours_and_torch(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark import COMPONENTS

    proc = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--breakdown", "--shapes", "tiny",
         "--repeats", "2", "--warmup", "1", "--out", str(tmp_path / "bench")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    bd = report["tiny"]["breakdown"]
    assert list(bd) == ["ours", "torch"]
    for impl, r in bd.items():
        comps = r["components"]
        assert list(comps) == list(COMPONENTS), impl
        assert all(c["ms"] > 0 for c in comps.values()), (impl, comps)
        assert math.isclose(sum(c["share"] for c in comps.values()), 1.0)
        assert math.isclose(r["sum_ms"], sum(c["ms"] for c in comps.values()))
        assert r["step_ms"] > 0 and r["n"] == 2
        assert math.isclose(r["explained"], r["sum_ms"] / r["step_ms"])
        assert r["gemm_gflops"] > 0
    machine = report["machine"]
    assert set(machine["gemm_gflops"]) == {"mlx", "torch"}
    assert machine["torch"]["blas"] and machine["torch"]["cpu_capability"]
    md = (tmp_path / "bench.md").read_text()
    first, table_head = md.splitlines()[0], md.split("**(tiny)")[1].splitlines()[0]
    assert machine["cpu_model"] in first and machine["cpu_model"] in table_head
    for label in COMPONENTS.values():
        assert f"| {label} |" in md
    assert "whole step, measured" in md and "sum / step" in md


# ------------------------------------------------ user mistakes


def run_benchmark(*args, timeout=60):
    return subprocess.run([sys.executable, "scripts/benchmark.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def one_error(proc) -> str:
    """The one `error:` line of a usage error (after argparse's usage line)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_unknown_flag_and_bad_values_are_one_error_line(tmp_path):
    assert "--bogus" in one_error(run_benchmark("--bogus"))
    assert "--rounds" in one_error(run_benchmark("--rounds", "0"))
    assert "--repeats" in one_error(run_benchmark("--breakdown", "--repeats", "x"))
    line = one_error(run_benchmark("--breakdown", "--impls", "mlx_lm"))
    assert "--breakdown times ours, ours_plain, torch only" in line
    (tmp_path / "file").write_text("not a folder")
    out = str(tmp_path / "file" / "bench")
    line = one_error(run_benchmark("--shapes", "tiny", "--out", out))
    assert line.startswith("error: output directory") and "not writable" in line
