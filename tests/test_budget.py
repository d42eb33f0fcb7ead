"""training.time_budget_minutes: the step count is measured once, fits the budget,
is written into the checkpoints, and a resumed run keeps it."""

import json
import time

BUDGET_MIN = 0.25


def test_time_budget_fixes_the_step_count(train_tiny, tmp_path):
    tic = time.time()
    ck, logs = train_tiny(
        tmp_path,
        training__time_budget_minutes=BUDGET_MIN,
        training__max_steps=100_000,
        eval__interval=40,
        checkpoint__interval=0,
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

    # Resume (more budget): the run keeps its measured step count and is finished.
    train_tiny(
        tmp_path,
        "--resume",
        "auto",
        training__time_budget_minutes=5,
        training__max_steps=100_000,
    )
    log = (logs / "train.log").read_text()
    assert f"the resumed run keeps its {steps} steps" in log, log
