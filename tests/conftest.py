"""Shared fixtures. Importing `src` first loads the optimized BLAS before any test
module imports mlx.core (see src/blas.py)."""

import src  # noqa: F401  (must precede every mlx import)
