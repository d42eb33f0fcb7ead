"""Resume and extend with the checkpoint as the truth (issue 16 item 6), through
the real `python -m src.train`: the config diff on resume, a schedule that
follows the run's step (no warm-up restart without optimizer state), the wsd
schedule and extending max_steps, `--resume auto` on a new run, and a refused
change. The schedules' values are checked against hand-written numbers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from src.checkpoint import store
from src.config import config_from_dict
from src.train.resume import config_changes, schedule_jump
from src.train.schedule import decay_start, lr_at, lr_schedule

ROOT = Path(__file__).resolve().parents[1]
RUN = "tiny"
LR = 3e-3  # configs/tiny.yaml's learning_rate, warm-up 10


def train_cmd(ds: dict, *extra: str, **kw) -> list[str]:
    """`python -m src.train` on configs/tiny.yaml, writing under ./ck and ./logs
    (relative: a copied run folder resumes with the same config)."""
    values = {
        "data.train_path": ds["train"],
        "data.val_path": ds["val"],
        "data.tokenizer_path": ds["tokenizer"],
        "checkpoint.dir": "ck",
        "logging.dir": "logs",
        "logging.progress_bar": "false",
        "logging.interval": 5,
        "eval.interval": 0,
        "eval.max_tokens": 512,
        "eval.sample_tokens": 0,
        "checkpoint.interval": 20,
        "checkpoint.keep_last": 5,
        "training.max_steps": 40,
    }
    values.update({k.replace("__", "."): v for k, v in kw.items()})
    sets = [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
    config = str(ROOT / "configs/tiny.yaml")
    return [sys.executable, "-m", "src.train", "--config", config, *sets, *extra]


def run(out: Path, ds: dict, *extra: str, **kw) -> subprocess.CompletedProcess:
    """Train in the folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        train_cmd(ds, *extra, **kw),
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def train_rows(out: Path, run_name: str = RUN) -> list[dict]:
    path = out / "logs" / run_name / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    return [r for r in rows if r["event"] == "train"]


def lrs(out: Path, run_name: str = RUN) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in train_rows(out, run_name)}


def losses(out: Path, run_name: str = RUN) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(out, run_name)}


def ckpt(out: Path, step: int, run_name: str = RUN) -> Path:
    return out / "ck" / run_name / f"step_{step:08d}"


def training(**kw):
    """A validated TrainingConfig of configs/tiny.yaml's schedule, changed by kw."""
    base = dict(learning_rate=LR, warmup_steps=10, max_steps=40)
    return config_from_dict({"training": {**base, **kw}}).training


@pytest.fixture(scope="module")
def cosine_run(tiny_dataset, tmp_path_factory) -> Path:
    """A finished 40-step cosine run with checkpoints at steps 20 and 40."""
    out = tmp_path_factory.mktemp("cosine")
    ok(run(out, tiny_dataset))
    return out


@pytest.fixture
def cosine_copy(cosine_run, tmp_path) -> Path:
    """A private copy of `cosine_run` to resume (links kept as links)."""
    out = tmp_path / "run"
    shutil.copytree(cosine_run, out, symlinks=True)
    return out


# ------------------------------------------------------------- the schedules


def test_wsd_values_equal_a_hand_written_reference():
    """warm-up 10 to 1e-3, constant, then linear to 1e-4 over the last 20 of 100."""
    t = training(schedule="wsd", learning_rate=1e-3, max_steps=100,
                 min_lr_ratio=0.1, decay_fraction=0.2)  # fmt: skip
    expected = {
        0: 1e-4,  # (0 + 1) / 10 of the peak
        4: 5e-4,
        9: 1e-3,  # the warm-up's last step reaches the peak
        10: 1e-3,
        50: 1e-3,
        80: 1e-3,  # the decay starts here (100 - 20)
        85: 1e-3 - 9e-4 * 5 / 20,
        90: 5.5e-4,
        99: 1e-3 - 9e-4 * 19 / 20,
        100: 1e-4,  # the floor, one past the last update
    }
    lr = lr_schedule(t)
    got = {s: lr(mx.array(s)).item() for s in expected}
    for s, want in expected.items():
        assert got[s] == pytest.approx(want, rel=1e-6), (s, got[s], want)
    assert decay_start(t) == 80
    # decay_fraction 0: constant after the warm-up, to the end
    flat = training(schedule="wsd", max_steps=100, decay_fraction=0.0)
    assert lr_at(flat, 99) == pytest.approx(LR, rel=1e-6)
    # the decay never begins before the warm-up ends
    short = training(schedule="wsd", max_steps=20, warmup_steps=10, decay_fraction=0.9)
    assert decay_start(short) == 10
    assert lr_at(short, 9) == pytest.approx(LR, rel=1e-6)


def test_cosine_is_the_default_and_unchanged():
    t = training(max_steps=110, min_lr_ratio=0.1)
    assert t.schedule == "cosine"
    expected = {0: LR / 10, 9: LR, 10: LR, 60: 0.55 * LR, 110: 0.1 * LR}
    for s, want in expected.items():
        assert lr_at(t, s) == pytest.approx(want, rel=1e-5), s


def test_wsd_extension_before_the_decay_changes_no_lr():
    """Every step before the shorter run's decay has the same lr at both lengths;
    `schedule_jump` says nothing there, and names both rates after it."""
    short, long = training(schedule="wsd"), training(schedule="wsd", max_steps=60)
    start = decay_start(short)
    assert start == 32
    for s in range(start + 1):
        assert lr_at(short, s) == lr_at(long, s), s
    meta = {"step": 20, "config": {"training": {**_saved(short)}}}
    assert schedule_jump(meta, config_from_dict({"training": _saved(long)})) is None
    meta["step"] = 36  # inside the decay: the rate jumps back to the peak
    line, warning = schedule_jump(meta, config_from_dict({"training": _saved(long)}))
    assert warning and "training.max_steps" in line and "step 32" in line
    assert f"{lr_at(short, 36):.4g}" in line and f"{lr_at(long, 36):.4g}" in line


def _saved(t) -> dict:
    keys = ("learning_rate", "min_lr_ratio", "warmup_steps", "max_steps",
            "schedule", "decay_fraction")  # fmt: skip
    return {k: getattr(t, k) for k in keys}


def test_config_changes_lists_each_key_and_fills_older_checkpoints():
    cfg = config_from_dict({"training": {"learning_rate": 1e-3, "max_steps": 50}})
    old = cfg.to_dict()
    old["training"].update(learning_rate=3e-3, max_steps=40)
    del old["training"]["schedule"]  # a checkpoint older than the key: cosine
    meta = {"step": 20, "config": old}
    assert config_changes(meta, cfg) == [
        "training.max_steps: 40 -> 50",
        "training.learning_rate: 0.003 -> 0.001",
    ]
    # with a time budget, the checkpoint's max_steps is kept: no change
    cfg.training.time_budget_minutes = 5.0
    assert config_changes(meta, cfg) == [
        "training.time_budget_minutes: 0.0 -> 5.0",
        "training.learning_rate: 0.003 -> 0.001",
    ]


# ------------------------------------------------------- through the real CLI


def test_extending_wsd_is_the_longer_run(tmp_path, tiny_dataset):
    """A 40-step wsd run resumed at step 20 (before its decay, at step 32) with
    max_steps=60 has the lr curve, and the losses, of an uninterrupted 60-step
    wsd run: no jump, and the diff names the change."""
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    ok(run(cut, tiny_dataset, training__schedule="wsd"))
    proc = ok(
        run(
            cut,
            tiny_dataset,
            "--resume",
            str(ckpt(cut, 20)),
            "--rewind",
            training__schedule="wsd",
            training__max_steps=60,
        )
    )
    assert "  training.max_steps: 40 -> 60" in proc.stderr
    assert "the learning rate at step" not in proc.stderr  # nothing changed there
    ok(run(whole, tiny_dataset, training__schedule="wsd", training__max_steps=60))
    got, want = lrs(cut), lrs(whole)
    assert sorted(got) == list(range(1, 61))
    assert got == want
    assert losses(cut) == losses(whole)  # the same updates, bit for bit
    assert want[40] == pytest.approx(LR) and want[60] < LR  # stable, then decayed


def test_extending_cosine_warns_with_both_rates(cosine_copy, tiny_dataset):
    """Cosine, 40 -> 60 steps from the final checkpoint: the documented jump,
    said with the lr at the resume step before and after; config.yaml becomes the
    new config and train.log keeps the diff."""
    out = cosine_copy
    before, after = lr_at(training(), 40), lr_at(training(max_steps=60), 40)
    assert after > 2 * before  # the stretched cosine is higher at step 40
    proc = ok(run(out, tiny_dataset, "--resume", "auto", training__max_steps=60))
    err = proc.stderr
    assert "resuming with 1 config change(s)" in err
    assert "  training.max_steps: 40 -> 60" in err
    warning = next(line for line in err.splitlines() if "learning rate at" in line)
    assert warning.startswith("warning: the learning rate at step 40 changes from")
    assert f"{before:.4g}" in warning and f"{after:.4g}" in warning
    got = lrs(out)
    assert got[40] == pytest.approx(lr_at(training(), 39), rel=1e-6)
    assert got[41] == pytest.approx(after, rel=1e-6)  # as the warning said
    log_dir = out / "logs" / RUN
    assert "max_steps: 60" in (log_dir / "config.yaml").read_text()
    assert "training.max_steps: 40 -> 60" in (log_dir / "train.log").read_text()


def test_changed_learning_rate_prints_the_diff(cosine_copy, tiny_dataset):
    out = cosine_copy
    base = lrs(out)
    proc = ok(
        run(
            out,
            tiny_dataset,
            "--resume",
            str(ckpt(out, 20)),
            "--rewind",
            training__learning_rate=1.5e-3,
        )
    )
    lines = proc.stderr.splitlines()
    changes = [line for line in lines if line.startswith("  ") and " -> " in line]
    assert changes == ["  training.learning_rate: 0.003 -> 0.0015"], changes
    assert "resuming with 1 config change(s)" in proc.stderr
    # a new scale only: said as information, not as a warning
    assert "\nthe learning rate at step 20 changes from" in proc.stderr
    got = lrs(out)
    assert got[20] == base[20]
    for s in range(21, 41):
        assert got[s] == pytest.approx(base[s] / 2, rel=1e-5), s


def test_no_optimizer_state_continues_the_schedule(cosine_copy, tiny_dataset):
    """A checkpoint saved the way `src.convert --from hf` saves one (no optimizer
    state) at step 20: the run continues at step 20's lr, no warm-up restart."""
    out = cosine_copy
    src = ckpt(out, 20)
    weights, _, meta = store.load_checkpoint(src)
    imported = out / "imported"
    path = store.save_checkpoint(imported, 20, weights, {}, meta, src / "tokenizer", 0)
    proc = ok(run(out, tiny_dataset, "--resume", str(path), run_name="fromimport"))
    assert "has no optimizer state" in proc.stderr
    assert "schedule continues at step 20" in proc.stderr
    assert "  run_name: tiny -> fromimport" in proc.stderr
    base, got = lrs(out), lrs(out, "fromimport")
    assert sorted(got) == list(range(21, 41))
    assert got == {s: base[s] for s in range(21, 41)}
    warm_restart = lr_at(training(), 0)
    assert not math.isclose(got[21], warm_restart)  # what the bug gave


def test_resume_auto_starts_a_new_run(tmp_path, tiny_dataset):
    proc = ok(run(tmp_path, tiny_dataset, "--resume", "auto", training__max_steps=5))
    notes = [line for line in proc.stderr.splitlines() if "--resume auto" in line]
    assert notes == [
        f"--resume auto: ck/{RUN} has no checkpoint yet; starting at step 0"
    ]
    assert sorted(lrs(tmp_path)) == [1, 2, 3, 4, 5]
    assert ckpt(tmp_path, 5).is_dir()


def test_resume_auto_over_logs_without_checkpoint_is_refused(tmp_path, tiny_dataset):
    log_dir = tmp_path / "logs" / RUN
    log_dir.mkdir(parents=True)
    (log_dir / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    proc = run(tmp_path, tiny_dataset, "--resume", "auto")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--overwrite instead of --resume auto" in errors[0]
    assert not list((tmp_path / "ck" / RUN).glob("step_*"))  # nothing trained
    assert (log_dir / "metrics.jsonl").read_text() == '{"event": "train", "step": 1}\n'


def test_refused_change_exits_2_with_one_error_line(cosine_copy, tiny_dataset):
    out = cosine_copy
    proc = run(out, tiny_dataset, "--resume", "auto", training__max_steps=60,
               model__d_model=128)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert "model.d_model: checkpoint 64 -> now 128" in proc.stderr
    assert "training.max_steps" not in proc.stderr  # refused before any diff
    assert sorted(lrs(out)) == list(range(1, 41))  # the logs untouched


def test_resume_auto_with_only_damaged_checkpoints_is_refused(tmp_path, tiny_dataset):
    """A run that has checkpoint folders, none valid, is not a new run: refused
    (C12), each damaged folder named once, nothing started."""
    damaged = tmp_path / "ck" / RUN / "step_00000005"
    damaged.mkdir(parents=True)
    proc = run(tmp_path, tiny_dataset, "--resume", "auto")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert [x for x in lines if x.startswith("error:")] == [
        f"error: nothing to resume in ck/{RUN}"
    ]
    warned = [x for x in lines if x.startswith("warning:")]
    assert len(warned) == 1 and "step_00000005" in warned[0], lines
    assert "warning: warning:" not in proc.stderr
    assert not (tmp_path / "logs" / RUN / "metrics.jsonl").exists()
