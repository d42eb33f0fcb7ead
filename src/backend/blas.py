"""Load an optimized CBLAS before `mlx.core` so the Linux CPU backend uses it.

MLX's Linux CPU wheel calls the standard `cblas_sgemm` symbol, which resolves to
a bundled netlib reference BLAS (~6 GFLOP/s on one core). A CBLAS exporting the
same unprefixed symbols, loaded with RTLD_GLOBAL before `mlx.core` is imported,
takes over (~200 GFLOP/s on two cores). This is the one place in the project that
branches on the platform. It never imports MLX.

Environment:
  SLM_BLAS=/path/to/libopenblas.so  use this library
  SLM_BLAS=off                      do not preload anything
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass

ENV_VAR = "SLM_BLAS"
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread"

# Known locations, best first (Debian/Ubuntu multiarch, then RPM-style layouts).
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/blis-pthread/libblis.so.4",
)


@dataclass
class BlasStatus:
    """What `preload` did. `path` is None when MLX keeps its bundled BLAS."""

    path: str | None = None
    reason: str = "not attempted"
    relevant: bool = True  # False where MLX never uses a CPU BLAS of ours (macOS)

    @property
    def optimized(self) -> bool:
        return self.path is not None


STATUS = BlasStatus()
_LIB: ctypes.CDLL | None = None
# Thread-count setters of the libraries we may load, tried in order.
_THREAD_SETTERS = ("openblas_set_num_threads", "bli_thread_set_num_threads",
                   "MKL_Set_Num_Threads")  # fmt: skip


def _find_library() -> str | None:
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    for name in ("openblas", "blis", "mkl_rt"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preload() -> BlasStatus:
    """Load an optimized CBLAS globally, once, if this platform needs it."""
    global STATUS
    if STATUS.reason != "not attempted":
        return STATUS
    if not sys.platform.startswith("linux"):
        STATUS = BlasStatus(
            None, "not needed on this platform (Accelerate/Metal)", False
        )
        return STATUS
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice.lower() in ("off", "0", "none", "reference"):
        STATUS = BlasStatus(None, f"disabled by {ENV_VAR}={choice}")
        return STATUS
    if "mlx.core" in sys.modules:
        STATUS = BlasStatus(
            None, "mlx.core was imported before src; too late to swap BLAS"
        )
        return STATUS
    path = choice or _find_library()
    if not path:
        STATUS = BlasStatus(None, "no optimized CBLAS found")
        return STATUS
    global _LIB
    try:
        _LIB = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    except OSError as exc:
        STATUS = BlasStatus(None, f"could not load {path}: {exc}")
        return STATUS
    STATUS = BlasStatus(path, "loaded")
    return STATUS


def set_threads(n: int) -> bool:
    """Let the loaded BLAS use `n` threads per call (False if none is loaded or it
    has no known setter). The trainer uses one thread per stream when it splits a
    batch over several CPU streams, which then run their GEMMs side by side."""
    for name in _THREAD_SETTERS if _LIB is not None else ():
        setter = getattr(_LIB, name, None)
        if setter is not None:
            setter(ctypes.c_int(max(1, n)))
            return True
    return False


def describe() -> str:
    """One log line saying which BLAS MLX's CPU backend will use."""
    if not STATUS.relevant:
        return f"BLAS: {STATUS.reason}"
    if STATUS.optimized:
        return f"BLAS: {STATUS.path}"
    return (
        f"WARNING: MLX will use its reference BLAS ({STATUS.reason}); fp32 matmuls "
        f"run ~30x slower. Install an optimized one: `{INSTALL_HINT}` "
        f"or set {ENV_VAR}=/path/to/libopenblas.so"
    )


def library_info() -> dict[str, str | None]:
    """What the loaded BLAS says of itself: `config`, its version and build
    (OpenBLAS: 'OpenBLAS 0.3.21 ... DYNAMIC_ARCH ...'; BLIS, MKL: the version), and
    `core`, the kernel set it picked for this CPU (OpenBLAS: 'Zen', 'Haswell',
    'SkylakeX', 'SapphireRapids', 'NeoverseN1'...; BLIS: its architecture). None
    where nothing is loaded or the library has no such call."""
    info: dict[str, str | None] = {"config": None, "core": None}
    if _LIB is None:
        return info
    for key, name in (("config", "openblas_get_config"),
                      ("core", "openblas_get_corename"),
                      ("config", "bli_info_get_version_str")):  # fmt: skip
        fn = getattr(_LIB, name, None)
        if fn is not None and info[key] is None:
            fn.restype = ctypes.c_char_p
            info[key] = (fn() or b"").decode(errors="replace").strip() or None
    query, arch_name = (getattr(_LIB, n, None) for n in ("bli_arch_query_id", "bli_arch_string"))  # fmt: skip
    if info["core"] is None and query is not None and arch_name is not None:
        arch_name.restype = ctypes.c_char_p
        info["core"] = (arch_name(query()) or b"").decode(errors="replace") or None
    mkl = getattr(_LIB, "MKL_Get_Version_String", None)
    if info["config"] is None and mkl is not None:
        buf = ctypes.create_string_buffer(256)
        mkl(buf, ctypes.c_int(len(buf)))
        info["config"] = buf.value.decode(errors="replace").strip() or None
    return info
