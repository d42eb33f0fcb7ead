#!/usr/bin/env bash
# Set up a machine: the optimized BLAS (Debian/Ubuntu), a .venv, and the package.
#   bash scripts/setup.sh            # runtime + dev tools
#   EXTRAS=dev,torch bash scripts/setup.sh   # also PyTorch (conversion, parity tests)
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev}
PYTHON=${PYTHON:-python3}

# MLX's Linux CPU wheel links a reference BLAS (~30x slower fp32 matmuls); src/backend/blas.py
# loads OpenBLAS instead when it is installed (see docs/performance.md, "Linux CPU fast path").
if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 \
   && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing libopenblas0-pthread (optimized BLAS for MLX on Linux)"
  $SUDO apt-get update -qq || echo "setup: apt-get update failed; trying the install anyway"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread \
    || echo "setup: WARNING: could not install libopenblas0-pthread; training will be slow"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml | cksum | cut -d' ' -f1)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  echo "setup: installing the package and its dependencies (extras: $EXTRAS)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
.venv/bin/python -c "import src, src.backend.blas as b; print('setup:', b.describe())"
