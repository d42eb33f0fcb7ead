"""scripts/benchmark.py end to end through its command line on the tiny shape:
our step, PyTorch and mlx-lm workers start from the same weights and batch, take
turns and are reported (JSON and markdown)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert set(res["ratios"]) == {"ours/torch", "ours/mlx_lm"}  # only what ran
    md = (tmp_path / "bench.md").read_text()
    assert "| mlx_lm |" in md and "ours/mlx_lm" in md
    machine = json.loads((tmp_path / "bench.json").read_text())["machine"]
    assert machine["gemm_gflops"] == res["gemm_gflops"]  # one shape: its ceiling
    first, table_head = md.splitlines()[0], md.split("**(tiny)")[1].splitlines()[0]
    assert machine["cpu_model"] in first and machine["cpu_model"] in table_head
    assert f"Machine: {machine['cpu_model']}" in md
    # the defaults: fp32, everything on the CPU, the 2048³ fp32 ceiling
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["devices"] == {"mlx": "Device(cpu, 0)", "torch": "cpu"}
    assert res["precision"] == "fp32" and res["torch"]["device"] == "cpu"
    assert res["gemm_size"] == {"mlx": 2048, "torch": 2048}
    assert "(grad_accum 1), fp32; GEMM ceiling (2048³ fp32, best of" in table_head


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


# ------------------------------------------------ precision, devices, the medium shape


def test_bf16_on_the_cpu_runs_and_says_so(tmp_path):
    """--precision bf16: our step in bf16 compute, torch under autocast(bf16), the
    ceiling GEMM in bf16 (small here: bf16 GEMMs have no fast CPU kernel)."""
    proc = run_benchmark("--shapes", "tiny", "--impls", "ours", "torch",
                         "--precision", "bf16", "--gemm-size", "128", "--rounds", "1",
                         "--warmup", "1", "--out", str(tmp_path / "bench"),
                         timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    res, rows = report["tiny"], report["tiny"]["results"]
    assert res["precision"] == "bf16"
    assert res["gemm_size"] == {"mlx": 128, "torch": 128}
    assert all(v > 0 for v in res["gemm_gflops"].values())
    assert report["devices"] == {"mlx": "Device(cpu, 0)", "torch": "cpu"}
    for impl in ("ours", "torch"):
        assert rows[impl]["tok_s"] > 0 and rows[impl]["mfu"] > 0, rows[impl]
    losses = [rows[k]["loss1"] for k in ("ours", "torch")]  # bf16 rounding apart
    assert abs(losses[0] - losses[1]) < 0.05, losses
    assert abs(losses[0] - math.log(256)) < 0.5
    # machine.summary's ceiling is the 2048³ fp32 one: not overwritten by this one
    assert "gemm_gflops" not in report["machine"]
    head = (tmp_path / "bench.md").read_text().split("**(tiny)")[1].splitlines()[0]
    assert "(grad_accum 1), bf16; GEMM ceiling (128³ bf16, best of" in head


def test_torch_on_cuda_without_cuda_is_one_error_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_error(run_benchmark("--shapes", "tiny", "--impls", "ours", "torch",
                                   "--torch-device", "cuda"))  # fmt: skip
    assert line.startswith("error: --torch-device cuda:") and "CUDA" in line, line
    assert "usage:" not in line


def test_breakdown_is_fp32_with_torch_on_the_cpu():
    line = one_error(run_benchmark("--breakdown", "--precision", "bf16"))
    assert "--breakdown times fp32 components" in line
    line = one_error(run_benchmark("--breakdown", "--torch-device", "cuda"))
    assert "--breakdown times fp32 components" in line
    assert "--precision" in one_error(run_benchmark("--precision", "fp16"))
    assert "--gemm-size" in one_error(run_benchmark("--gemm-size", "8"))


def test_medium_shape_is_listed_and_about_124m_parameters():
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark import shape_sets

    from src.config import config_from_dict

    help_text = run_benchmark("--help").stdout
    assert "--precision" in help_text and "--torch-device" in help_text
    assert "medium" in help_text.split("--shapes")[1].split("--impls")[0]
    desc, spec = shape_sets()["medium"]
    cfg = config_from_dict(spec)  # the config alone: no model is built
    assert 120e6 < cfg.model.num_params() < 130e6, cfg.model.num_params()
    assert (cfg.training.batch_size, cfg.model.context_length) == (8, 1024)
    assert "124M" in desc


def test_gemm_ceiling_size_follows_the_device_and_dtype():
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_common import best_gflops, gemm_size

    assert gemm_size(True, "bf16") == gemm_size(True, "fp32") == 8192
    assert gemm_size(False, "fp32") == 2048 and gemm_size(False, "bf16") == 1024
    calls = []
    assert best_gflops(lambda: calls.append(1), n=64, reps=3) > 0
    assert len(calls) == 4  # one untimed, then the repeats


def test_gpu_headers_name_the_devices():
    """The table header of a GPU run names each framework's device and the
    ceiling in the compute dtype (formatting only: no GPU needed)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark import device_label, table

    from src.backend.machine import describe, short

    machine = describe()
    cpu = {"mlx": "Device(cpu, 0)", "torch": "cpu"}
    assert device_label(machine, cpu) == short(machine)
    gpu = {"mlx": "Device(gpu, 0) (NVIDIA H200)", "torch": "cuda (NVIDIA H200)"}
    where = device_label(machine, gpu)
    assert where == "mlx on Device(gpu, 0) (NVIDIA H200), torch on cuda (NVIDIA H200)"
    row = dict(tok_s=1e5, step_s=0.08, n=3, mfu=0.4, rss_peak=2**30, mlx_peak=2**33,
               loss1=10.4, warmup_s=20.0)  # fmt: skip
    res = dict(params=123.7e6, batch=8, context=1024, precision="bf16",
               gemm_size={"mlx": 8192, "torch": 8192},
               gemm_gflops={"mlx": 700e3, "torch": 750e3},
               results={"ours": row, "torch": row}, ratios={"ours/torch": 1.0})  # fmt: skip
    head = table("medium", "configs/medium.yaml", res, where).splitlines()[0]
    assert head.startswith(f"**(medium) configs/medium.yaml** on {where}: 123.7M")
    assert "bf16; GEMM ceiling (8192³ bf16, best of MLX / torch): 700000" in head
    res["gemm_size"] = {"mlx": 8192, "torch": 2048}
    head = table("medium", "configs/medium.yaml", res, where).splitlines()[0]
    assert "GEMM ceiling (mlx 8192³ / torch 2048³ bf16," in head


def test_bf16_against_torch_on_cuda(tmp_path):
    """Where PyTorch sees a GPU: the tiny shape in bf16 with torch on it."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA here")
    proc = run_benchmark("--shapes", "tiny", "--impls", "ours", "torch",
                         "--precision", "bf16", "--torch-device", "cuda",
                         "--gemm-size", "1024", "--rounds", "2", "--warmup", "1",
                         "--out", str(tmp_path / "bench"), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["devices"]["torch"].startswith("cuda (")
    rows = report["tiny"]["results"]
    assert abs(rows["ours"]["loss1"] - rows["torch"]["loss1"]) < 0.05, rows
    assert (
        f"torch on {report['devices']['torch']}" in (tmp_path / "bench.md").read_text()
    )


# ------------------------------------------------ scripts/bench_kernels.py


def test_kernel_benchmark_times_ours_against_each_reference(tmp_path):
    """Every kernel has ours, MLX's fused op and (with --torch) torch's, each
    timed, ratios against ours."""
    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_kernels.py", "--tokens", "64", "--vocab",
         "256", "--width", "64", "--repeats", "2", "--torch", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "machine: " in proc.stdout and "| cross_entropy | torch |" in proc.stdout
    got = json.loads(out.read_text())
    assert got["shape"] == {"tokens": 64, "vocab": 256, "width": 64}
    for kernel in ("cross_entropy", "softmax", "silu_mul"):
        assert set(got["ms"][kernel]) == {"ours", "mlx_fused", "torch"}, got["ms"]
    assert all(ms > 0 for row in got["ms"].values() for ms in row.values())
    assert got["machine"]["cpu_model"]


def test_kernel_benchmark_bad_values_are_one_error_line():
    for args in (["--tokens", "0"], ["--vocab", "x"], ["--bogus"]):
        proc = subprocess.run([sys.executable, "scripts/bench_kernels.py", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert args[0] in one_error(proc)
