"""mlx-slm-trainer: pretrain small GPT-style language models with MLX.

Importing the package loads an optimized CBLAS before MLX is imported (see
`src.backend.blas`): on Linux, MLX's CPU wheel links a reference BLAS that runs fp32
matmuls ~30x slower. This is the project's single platform-specific hook; it
loads a shared library and nothing else (no MLX import, no output).
"""

from .backend import blas as _blas

_blas.preload()
