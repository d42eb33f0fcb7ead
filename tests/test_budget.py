"""training.time_budget_minutes: the step count is measured once, fits the budget,
is written into the checkpoints, and a resumed run keeps it."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.checkpoint.store import list_checkpoints

# The step count is measured from the clock: run alone (scripts/test.sh).
pytestmark = pytest.mark.serial

ROOT = Path(__file__).resolve().parents[1]

BUDGET_MIN = 0.25


def test_time_budget_fixes_the_step_count(train_tiny, tiny_dataset, tmp_path):
    tic = time.time()
    ck, logs = train_tiny(
        tmp_path,
        training__time_budget_minutes=BUDGET_MIN,
        training__max_steps=100_000,
        eval__interval=40,
        checkpoint__interval=10,
    )
    wall = time.time() - tic
    meta = json.loads((ck / "latest" / "meta.json").read_text())
    steps = meta["config"]["training"]["max_steps"]
    assert 10 < steps < 100_000 and meta["step"] == steps
    log = (logs / "train.log").read_text()
    assert f"{steps} steps fit in the" in log, log
    # The whole process (start-up, measurement, training, evaluations, saves) ends
    # near the budget; generous bounds, as the machine may be shared.
    assert 0.5 * BUDGET_MIN * 60 < wall < 2.0 * BUDGET_MIN * 60 + 10, wall

    # A finished budget run has nothing left to train: refused, saying so.
    done = subprocess.run(
        [sys.executable, "-m", "src.train", "--config", "configs/tiny.yaml",
         "--resume", "auto", *sets(tmp_path, tiny_dataset, 5)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"the end of its time budget (training.max_steps={steps})" in done.stderr

    # Rewound to an earlier checkpoint with more budget: the run keeps its
    # measured step count and ends there.
    earlier = list_checkpoints(ck)[0]
    assert int(earlier.name.split("_")[1]) < steps
    train_tiny(
        tmp_path,
        "--resume",
        str(earlier),
        "--rewind",
        training__time_budget_minutes=5,
        training__max_steps=100_000,
    )
    log = (logs / "train.log").read_text()
    assert f"the resumed run keeps its {steps} steps" in log, log
    assert json.loads((ck / "latest" / "meta.json").read_text())["step"] == steps


def sets(out, data, budget):
    pairs = {
        "data.train_path": data["train"],
        "data.val_path": data["val"],
        "data.tokenizer_path": data["tokenizer"],
        "checkpoint.dir": out / "ck",
        "logging.dir": out / "logs",
        "training.time_budget_minutes": budget,
    }
    return [a for k, v in pairs.items() for a in ("--set", f"{k}={v}")]
