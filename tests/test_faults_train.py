"""The training loop under issue 15's faults, through the real CLI: a log file that
cannot be written (item 6), the non-finite guard's limit (item 17), a stop at an
evaluation step (item 18) and a sample prompt that fails (item 12)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = "tiny"

# The trainer as `python -m src.train`, with the tokenizer's encode failing for the
# prompt "FAIL" as it does for text that is not valid UTF-8.
FAILING_PROMPT = """
import runpy, sys
from src.errors import TokenizerError
from src.tokenizer.spm import Tokenizer
encode = Tokenizer.encode
def failing(self, text, *args, **kwargs):
    if text == "FAIL":
        raise TokenizerError("text to encode is not valid UTF-8 (injected)")
    return encode(self, text, *args, **kwargs)
Tokenizer.encode = failing
sys.argv[0] = "src.train"
runpy.run_module("src.train", run_name="__main__", alter_sys=True)
"""

# The trainer with the learning rate multiplied by 1e30 from the 6th update on (a
# value the config refuses): that update is finite, every later step is not.
LR_BLOWS_UP = """
import runpy, sys
import mlx.core as mx
from src.train import optim
schedule = optim.lr_schedule
def blows_up(cfg):
    lr = schedule(cfg)
    return lambda step: lr(step) * mx.where(step >= 5, 1e30, 1.0)
optim.lr_schedule = blows_up
sys.argv[0] = "src.train"
runpy.run_module("src.train", run_name="__main__", alter_sys=True)
"""


def train_args(out: Path, ds: dict, *extra: str, **kw) -> list[str]:
    values = {
        "data.train_path": ds["train"],
        "data.val_path": ds["val"],
        "data.tokenizer_path": ds["tokenizer"],
        "checkpoint.dir": out / "ck",
        "logging.dir": out / "logs",
        "logging.progress_bar": "false",
        "logging.interval": 5,
        "eval.max_tokens": 512,
        "eval.sample_tokens": 4,
        "eval.interval": 0,
        "checkpoint.interval": 0,
        "model.dropout": 0.1,
        "training.max_steps": 30,
    }
    values.update({k.replace("__", "."): v for k, v in kw.items()})
    sets = [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
    return ["--config", str(ROOT / "configs/tiny.yaml"), *sets, *extra]


def train_cmd(out: Path, ds: dict, *extra: str, **kw) -> list[str]:
    return [sys.executable, "-m", "src.train", *train_args(out, ds, *extra, **kw)]


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)


def rows(out: Path, event: str = "train") -> list[dict]:
    text = (out / "logs" / RUN / "metrics.jsonl").read_text()
    return [
        r for line in text.splitlines() if (r := json.loads(line))["event"] == event
    ]


def saved_steps(out: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (out / "ck" / RUN).glob("step_*"))


def meta(out: Path, step: int) -> dict:
    return json.loads((out / "ck" / RUN / f"step_{step:08d}" / "meta.json").read_text())


def errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error")]


class Trainer:
    """A trainer subprocess whose stderr lines are collected as they come."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(
            target=lambda: self.lines.extend(self.proc.stderr), daemon=True
        )
        self.reader.start()

    def wait_for(self, ready, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not ready():
            if self.proc.poll() is not None:
                pytest.fail(f"trainer exited before {what}: {self.stderr[-3000:]}")
            if time.time() > deadline:
                self.proc.kill()
                pytest.fail(f"no {what} in time")
            time.sleep(0.01)

    def finish(self) -> int:
        code = self.proc.wait(timeout=120)
        self.reader.join(timeout=10)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("name", ["metrics.jsonl", "train.log"])
def test_item6_full_log_disk_saves_and_stops(tmp_path, tiny_dataset, name):
    """Item 6: a log file whose writes fail with ENOSPC in the middle of a run (it
    becomes a link to /dev/full) ends the run with a save of the step reached, one
    `error:` line naming the file and saying "disk full", and exit 2; resume works."""
    target = tmp_path / "logs" / RUN / name
    trainer = Trainer(train_cmd(tmp_path, tiny_dataset, training__max_steps=3000))
    metrics = tmp_path / "logs" / RUN / "metrics.jsonl"
    trainer.wait_for(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
        "three logged steps",
    )
    link = target.with_name("full.tmp")
    link.symlink_to("/dev/full")
    link.replace(target)  # atomically: the next write to it fails
    code = trainer.finish()
    assert code == 2, trainer.stderr[-3000:]
    (line,) = errors(trainer.stderr)
    assert str(target) in line and "disk full" in line, line
    (step,) = saved_steps(tmp_path)
    assert 5 <= step < 3000 and f"step {step}" in line, (step, line)
    assert meta(tmp_path, step)["step"] == step
    assert not (tmp_path / "logs" / RUN / "report.md").exists()  # logs incomplete

    target.unlink()  # room again
    resumed = run(
        train_cmd(
            tmp_path, tiny_dataset, "--resume", "auto", training__max_steps=step + 5
        )
    )
    assert resumed.returncode == 0 and not errors(resumed.stderr), resumed.stderr
    assert saved_steps(tmp_path)[-1] == step + 5
    logged = [r["step"] for r in rows(tmp_path)]
    assert logged[-5:] == list(range(step + 1, step + 6)) and len(set(logged)) == len(
        logged
    )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_item6_unwritable_log_before_training(tmp_path, tiny_dataset):
    """Item 6: a resume whose train.log cannot be written stops before the first
    step, with one `error:` line and exit 2; the checkpoints stay as they were."""
    first = run(train_cmd(tmp_path, tiny_dataset, training__max_steps=10))
    assert first.returncode == 0, first.stderr[-3000:]
    log = tmp_path / "logs" / RUN / "train.log"
    log.unlink()
    log.symlink_to("/dev/full")
    proc = run(
        train_cmd(tmp_path, tiny_dataset, "--resume", "auto", training__max_steps=20)
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = errors(proc.stderr)
    assert str(log) in line and "disk full" in line and "first step" in line, line
    assert saved_steps(tmp_path) == [10]
    assert [r["step"] for r in rows(tmp_path)][-1] == 10


# The trainer with the disk full when report.md is written (after the last save).
REPORT_DISK_FULL = """
import errno, runpy, sys
from src import report
real = report.atomic_file
def full(path, *args, **kwargs):
    if str(path).endswith("report.md"):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real(path, *args, **kwargs)
report.atomic_file = full
sys.argv[0] = "src.train"
runpy.run_module("src.train", run_name="__main__", alter_sys=True)
"""


def test_item6_report_disk_full_after_the_save(tmp_path, tiny_dataset):
    """Item 6: the report (written after the final save) hits a full disk: the
    run is saved and complete, one `error:` names report.md and the full disk,
    and the exit status is non-zero."""
    argv = train_cmd(tmp_path, tiny_dataset, training__max_steps=10)
    proc = run([sys.executable, "-c", REPORT_DISK_FULL, *argv[3:]])
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = errors(proc.stderr)
    assert "report.md" in line and "disk full" in line, line
    assert saved_steps(tmp_path) == [10]
    assert not (tmp_path / "logs" / RUN / "report.md").exists()


def test_item6_closed_console_does_not_stop_the_run(tmp_path, tiny_dataset):
    """Item 6: the console going away (`... 2>&1 | head` has exited) is no reason
    to lose the run: it trains to the end and saves; train.log has every line."""
    argv = train_cmd(tmp_path, tiny_dataset, training__max_steps=20)
    proc = subprocess.Popen(
        argv, cwd=ROOT, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr.readline().startswith("BLAS:")
    proc.stderr.close()  # every later write to stderr fails (EPIPE)
    assert proc.wait(timeout=120) == 0
    assert saved_steps(tmp_path) == [20]
    log = (tmp_path / "logs" / RUN / "train.log").read_text()
    assert "step 20: loss" in log and "report:" in log


def test_item17_non_finite_limit_is_checked_every_step(tmp_path, tiny_dataset):
    """Item 17 (N1): with logs flushed every 50 steps, non-finite steps stop the run
    at the step where the limit (3 in a row) is reached, naming it; the skipped
    steps are logged; the saves before it hold finite values, none after."""
    args = train_args(
        tmp_path,
        tiny_dataset,
        training__max_consecutive_skips=3,
        training__max_steps=40,
        logging__interval=50,
        checkpoint__interval=4,
    )
    proc = run([sys.executable, "-c", LR_BLOWS_UP, *args])
    assert proc.returncode == 1, proc.stderr[-3000:]
    logged = rows(tmp_path)
    skipped = [r["step"] for r in logged if r["skipped"]]
    last = logged[-1]["step"]
    assert skipped == [7, 8, 9] and last == 9, (skipped, last)
    (line,) = errors(proc.stderr)
    assert "stopping at step 9: 3 consecutive steps with a non-finite" in line, line
    assert saved_steps(tmp_path) == [4, 8]  # the store refuses non-finite values
    assert "step 7: non-finite loss or gradient; update skipped" in proc.stderr


def test_item18_stop_at_an_eval_step_keeps_its_validation(tmp_path, tiny_dataset):
    """Item 18 (C2): SIGTERM at an evaluation step (every step is one here) still
    validates before the save, so that checkpoint has its val_loss; resuming gives
    the uninterrupted run's losses, validations and best checkpoint exactly."""
    kw = dict(training__max_steps=20, eval__interval=1, eval__sample_tokens=0)
    base, cut = tmp_path / "base", tmp_path / "cut"
    proc = run(train_cmd(base, tiny_dataset, **kw))
    assert proc.returncode == 0, proc.stderr[-3000:]

    trainer = Trainer(train_cmd(cut, tiny_dataset, **kw))
    # the last line before the first step: the signal lands in that step
    trainer.wait_for(lambda: "tokens per step" in trainer.stderr, "start-up")
    trainer.proc.send_signal(signal.SIGTERM)
    assert trainer.finish() == 0, trainer.stderr[-3000:]
    (step,) = saved_steps(cut)
    assert step < 20
    val = {r["step"]: r["val_loss"] for r in rows(base, "eval")}
    assert meta(cut, step)["val_loss"] == val[step]
    assert [r["step"] for r in rows(cut, "eval")] == list(range(1, step + 1))

    resumed = run(train_cmd(cut, tiny_dataset, "--resume", "auto", **kw))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    loss = {r["step"]: r["loss"] for r in rows(base)}
    assert {r["step"]: r["loss"] for r in rows(cut)} == loss
    assert {r["step"]: r["val_loss"] for r in rows(cut, "eval")} == val
    best = min((step, 20), key=lambda s: val[s])  # the saved checkpoints' best
    assert (cut / "ck" / RUN / "best").resolve().name == f"step_{best:08d}"
    assert meta(cut, 20)["best_val_loss"] == val[best]


def test_item12_failing_sample_prompt_keeps_the_save(tmp_path, tiny_dataset):
    """Item 12 (loop side): a sample prompt whose encoding fails is a warning; the
    run saves, samples the other prompts, and trains exactly as without it (the
    failed sample leaves dropout on)."""
    prompts = "[FAIL, Once upon a time]"
    kw = dict(training__max_steps=20, eval__interval=10, checkpoint__interval=10)
    args = train_args(tmp_path, tiny_dataset, eval__sample_prompts=prompts, **kw)
    proc = run([sys.executable, "-c", FAILING_PROMPT, *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not errors(proc.stderr)
    warned = [line for line in proc.stderr.splitlines() if "no sample" in line]
    assert len(warned) == 2 and "'FAIL'" in warned[0] and "UTF-8" in warned[0]
    assert saved_steps(tmp_path) == [10, 20]
    assert [(r["step"], r["prompt"]) for r in rows(tmp_path, "sample")] == [
        (10, "Once upon a time"),
        (20, "Once upon a time"),
    ]
    plain = tmp_path / "plain"
    ok = run(train_cmd(plain, tiny_dataset, **kw))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert [r["loss"] for r in rows(tmp_path)] == [r["loss"] for r in rows(plain)]


def test_loss_spike_is_warned_with_its_step(tmp_path):
    """N2: a loss above training.spike_factor x its moving average is a warning
    naming the step (in train.log and on the console); a non-spike is not."""
    import mlx.core as mx
    from tqdm import tqdm

    from src.train.logbook import RunLog, StepRecord

    log = RunLog(tmp_path, progress_bar=False)
    losses = [3.0, 2.9, 2.8, 2.8, 30.0, 2.7]  # step 5 is ten times the average
    pending = [
        StepRecord(i + 1, mx.array(x), mx.array(1.0), mx.array(True), mx.array(1e-3))
        for i, x in enumerate(losses)
    ]
    log.flush_steps(pending, 1000.0, 3.0, tqdm(disable=True))
    text = (tmp_path / "train.log").read_text()
    assert "step 5: loss spike 30.0000" in text, text
    assert text.count("loss spike") == 1, text
