"""Training speed: our step vs PyTorch and mlx-lm (see src/bench/training.py).

    python scripts/benchmark.py [--quick] [--shapes a b] [--impls ...] [--rounds N]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import src  # noqa: E402,F401  (loads the optimized BLAS; must precede mlx)
from src.bench.training import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
