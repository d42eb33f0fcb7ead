#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole test suite.
#   bash scripts/test.sh              # everything: the suite on TEST_WORKERS (2)
#                                     # processes, then the timing-sensitive tests
#                                     # (marked `serial`) alone
#   bash scripts/test.sh ARGS...      # lint, then `pytest ARGS` as given (one process;
#                                     # add -n 2 for two)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev,torch,monitor,gguf} bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
# The tests that time themselves (a budget of seconds, a connect timeout) run after
# the others, alone: with a second worker beside them their clocks would not be theirs.
parallel=0 serial=0
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" -m "not serial" || parallel=$?
.venv/bin/python -m pytest -q -p no:xdist -m serial || serial=$?
exit $(( parallel ? parallel : serial ))
