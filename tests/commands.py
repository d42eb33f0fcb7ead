"""Running a command as a user does, for the tests: `python -m src.X ARGS` in a
subprocess, and the shape of a user error (exit 2, one `error:` line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(
    module: str, *args, input=None, cwd=ROOT, timeout=300
) -> subprocess.CompletedProcess:
    """`python -m src.<module> ARGS` (from `cwd`, the repository on the path);
    never a traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", f"src.{module}", *map(str, args)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def user_error(proc, *words) -> str:
    """Assert exit 2 and one stderr line, `error: ...` holding `words`; that line."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(w in lines[0] for w in words), (words, proc.stderr)
    return lines[0]
