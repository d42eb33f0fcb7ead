"""What machine a process runs on, in the terms that decide training speed.

`describe()` returns a JSON-ready dict: the CPU model, its physical and logical
core counts (and those this process may use), the instruction-set extensions
that matter for fp32/bf16 GEMMs (AVX2, FMA, AVX-512 F/BF16/VNNI, AMX; NEON, SVE,
BF16, I8MM, SME on ARM), the BLAS MLX's CPU backend uses (`src.backend.blas`:
which library, its build and the kernel set it chose for this CPU), and MLX's
version and backend (cpu, metal or cuda). `summary()` words it as one line.

Speed numbers from different machines are not comparable without this: the
same code runs ~1.8x faster GEMMs on a CPU with AVX-512/AMX than on one with
AVX2 only. Sources: /proc/cpuinfo and /sys on Linux, `sysctl` on macOS, the
`platform` module elsewhere. MLX is imported only inside `mlx_backend()`.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import blas

# Linux /proc/cpuinfo flags reported on x86, in this order.
X86_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")  # fmt: skip
# Linux /proc/cpuinfo "Features" on ARM -> the name reported.
ARM_FEATURES = {"asimd": "neon", "sve": "sve", "sve2": "sve2", "bf16": "bf16",
                "i8mm": "i8mm", "sme": "sme"}  # fmt: skip
# macOS `sysctl hw.optional` keys -> the name reported (Apple Silicon and Intel).
MACOS_FEATURES = {
    "hw.optional.neon": "neon", "hw.optional.AdvSIMD": "neon",
    "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_SME": "sme", "hw.optional.arm.FEAT_SME2": "sme2",
    "hw.optional.avx2_0": "avx2", "hw.optional.fma": "fma",
    "hw.optional.avx512f": "avx512f", "hw.optional.avx512vnni": "avx512_vnni",
}  # fmt: skip


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    """/proc/cpuinfo as one {field: value} dict per logical CPU."""
    blocks = []
    for chunk in text.strip().split("\n\n"):
        fields = {}
        for line in chunk.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks


def linux_cpu(cpuinfo: str) -> dict:
    """Model name, physical cores and ISA flags from the text of /proc/cpuinfo."""
    blocks = _cpuinfo_blocks(cpuinfo)
    first = blocks[0] if blocks else {}
    model = first.get("model name") or first.get("Model") or first.get("Hardware")
    if not model and first.get("CPU implementer"):  # ARM without a model name
        model = f"ARM implementer {first['CPU implementer']} part {first.get('CPU part', '?')}"  # fmt: skip
    flags = set(first.get("flags", "").split())
    features = set(first.get("Features", "").split())
    isa = [f for f in X86_FLAGS if f in flags]
    isa += list(dict.fromkeys(v for k, v in ARM_FEATURES.items() if k in features))
    cores = {(b.get("physical id"), b.get("core id")) for b in blocks}
    physical = len(cores) if "core id" in first else _sysfs_physical_cores()
    return {"cpu_model": model, "physical_cores": physical, "isa": isa}


def _sysfs_physical_cores() -> int | None:
    """Distinct (package, core) pairs under /sys (ARM's cpuinfo has no core ids)."""
    pairs = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            pairs.add(
                tuple((topo / f).read_text().strip()
                      for f in ("physical_package_id", "core_id"))
            )  # fmt: skip
        except OSError:
            continue
    return len(pairs) or None


def _sysctl(*args: str) -> str:
    try:
        out = subprocess.run(["sysctl", *args], capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def macos_cpu() -> dict:
    """Model name, physical cores and ISA flags from `sysctl`."""
    optional = dict(
        line.split(": ", 1) for line in _sysctl("hw.optional").splitlines() if ": " in line
    )  # fmt: skip
    isa = [name for key, name in MACOS_FEATURES.items() if optional.get(key) == "1"]
    physical = _sysctl("-n", "hw.physicalcpu")
    return {
        "cpu_model": _sysctl("-n", "machdep.cpu.brand_string") or None,
        "physical_cores": int(physical) if physical.isdigit() else None,
        "isa": list(dict.fromkeys(isa)),
    }


def usable_cores() -> int:
    """The logical CPUs this process may run on (its affinity mask, where known)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def blas_info() -> dict:
    """The BLAS MLX's CPU backend uses (see `src.backend.blas`)."""
    status, lib = blas.STATUS, blas.library_info()
    if not status.relevant:
        name = "Accelerate" if sys.platform == "darwin" else "MLX's own"
    elif status.optimized:
        name = lib["config"] or Path(status.path).name
        if name.startswith("OpenBLAS"):  # 'OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH ...'
            name = " ".join(name.split()[:2])
    else:
        name = "reference (netlib, bundled with MLX)"
    return {"name": name, "path": status.path, "status": status.reason, **lib}


def mlx_backend() -> str:
    """cpu, metal, cuda (or gpu): where MLX computes by default."""
    import mlx.core as mx

    if mx.default_device().type == mx.DeviceType.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "gpu"


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def describe() -> dict:
    """The machine (see the module docstring): keys cpu_model, arch, os,
    physical_cores, logical_cores, usable_cores, isa (list), blas (dict), mlx (dict)."""
    cpu: dict = {"cpu_model": None, "physical_cores": None, "isa": []}
    if sys.platform.startswith("linux"):
        try:
            cpu = linux_cpu(Path("/proc/cpuinfo").read_text())
        except OSError:
            pass
    elif sys.platform == "darwin":
        cpu = macos_cpu()
    logical = os.cpu_count() or 1
    return {
        "cpu_model": cpu["cpu_model"]
        or platform.processor()
        or platform.machine()
        or "unknown CPU",  # fmt: skip
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "physical_cores": cpu["physical_cores"] or logical,
        "logical_cores": logical,
        "usable_cores": usable_cores(),
        "isa": cpu["isa"],
        "blas": blas_info(),
        "mlx": {"version": _version("mlx"), "backend": mlx_backend()},
    }


def summary(machine: dict) -> str:
    """One line: 'AMD EPYC (x86_64), 2 cores / 2 threads, avx2 fma; BLAS ...'."""
    m, b = machine, machine["blas"]
    cores = f"{m['physical_cores']} cores / {m['logical_cores']} threads"
    if m["usable_cores"] != m["logical_cores"]:
        cores += f" ({m['usable_cores']} usable)"
    isa = " ".join(m["isa"]) or "no AVX2/NEON flags found"
    kernels = f", kernels {b['core']}" if b.get("core") else ""
    text = (
        f"{m['cpu_model']} ({m['arch']}, {m['os']}), {cores}, {isa}; "
        f"BLAS {b['name']}{kernels}; MLX {m['mlx']['version']} ({m['mlx']['backend']})"
    )
    if "torch" in m:
        t = m["torch"]
        text += f"; torch {t['version']} (BLAS {t['blas']}, {t['cpu_capability']})"
    if m.get("gemm_gflops"):
        g = m["gemm_gflops"]
        text += "; GEMM 2048³ fp32 " + " / ".join(f"{k} {v:.0f}" for k, v in g.items())
        text += " GFLOP/s"
    return text


def short(machine: dict) -> str:
    """A few words for a table header: 'AMD EPYC, 2 cores, avx2'."""
    wide = [f for f in machine["isa"] if f.startswith(("avx512f", "amx_tile", "sve"))]
    isa = ", ".join(wide or [f for f in machine["isa"] if f in ("avx2", "neon")])
    return f"{machine['cpu_model']}, {machine['usable_cores']} cores" + (
        f", {isa}" if isa else ""
    )
