"""What a new user sees while training (issue 19, training feedback), through the
real CLI: the first step's compilation announced, timed and kept out of tokens/s
and the ETA; train.log's loss lines whatever the progress bar; the bar only on a
terminal; and the `slm-*` console scripts."""

import importlib
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = "tiny"
SLOW = 4.0  # seconds the first step sleeps: a compilation that takes a while

# The trainer as `python -m src.train`, its first step SLOW seconds longer (as a
# bigger model's compilation is).
SLOW_FIRST_STEP = f"""
import runpy, sys, time
from src.train.trainer import Trainer
step = Trainer._step
def slow_first(self, n):
    if n == self.start:
        time.sleep({SLOW})
    return step(self, n)
Trainer._step = slow_first
sys.argv[0] = "src.train"
runpy.run_module("src.train", run_name="__main__", alter_sys=True)
"""


def train_args(out: Path, ds: dict, **kw) -> list[str]:
    values = {
        "data.train_path": ds["train"],
        "data.val_path": ds["val"],
        "data.tokenizer_path": ds["tokenizer"],
        "checkpoint.dir": out / "ck",
        "logging.dir": out / "logs",
        "logging.interval": 10,
        "eval.max_tokens": 512,
        "eval.sample_tokens": 0,
        "eval.interval": 0,
        "checkpoint.interval": 0,
        "training.max_steps": 30,
    }
    values.update({k.replace("__", "."): v for k, v in kw.items()})
    sets = [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
    return ["--config", str(ROOT / "configs/tiny.yaml"), *sets]


def slow_first_cmd(out: Path, ds: dict, **kw) -> list[str]:
    return [sys.executable, "-c", SLOW_FIRST_STEP, *train_args(out, ds, **kw)]


def train_log(out: Path) -> str:
    return (out / "logs" / RUN / "train.log").read_text(encoding="utf-8")


def loss_lines(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"step (\d+): loss \d", text)]


def test_first_step_is_announced_timed_and_kept_out_of_tokens_per_s(
    tmp_path, tiny_dataset
):
    """'compiling the training step...' before the first step, 'compiled in X s'
    after it (console and train.log); the tokens/s of the first logging interval
    counts the steps after it only."""
    cmd = slow_first_cmd(tmp_path, tiny_dataset, logging__progress_bar="false")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in (proc.stderr, train_log(tmp_path)):
        assert "compiling the training step...\n" in text, text
        took = re.search(r"compiled in (\d+\.\d) s\n", text)
        assert took and float(took[1]) >= SLOW, text
        assert text.index("compiling the") < took.start() < text.index("step 10:")
    rows = [
        json.loads(line) for line in open(tmp_path / "logs" / RUN / "metrics.jsonl")
    ]
    first = next(r for r in rows if "tokens_per_s" in r)
    assert first["step"] == 10
    # With the first step in, 10 steps of 512 tokens took more than SLOW seconds.
    assert first["tokens_per_s"] > 10 * 512 / SLOW, first


def test_no_terminal_no_bar_and_train_log_has_the_loss_lines(tmp_path, tiny_dataset):
    """progress_bar true, stderr a pipe: no carriage-return redraws, the console
    and train.log both get a 'step N: loss' line at every logging interval."""
    cmd = [sys.executable, "-m", "src.train"]
    cmd += train_args(tmp_path, tiny_dataset, logging__progress_bar="true")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300)
    err = proc.stderr.decode()  # as bytes: text mode would turn \r into \n
    assert proc.returncode == 0, err[-3000:]
    assert "\r" not in err, err[-3000:]
    assert loss_lines(err) == [10, 20, 30], err
    assert loss_lines(train_log(tmp_path)) == [10, 20, 30], train_log(tmp_path)


def run_in_terminal(argv: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr a pseudo-terminal (100 columns);
    its exit status and all it wrote there."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    seen, end = b"", time.time() + timeout
    try:
        while time.time() < end:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed its end
                    break
                if not chunk:
                    break
                seen += chunk
        return proc.wait(timeout=30), seen.decode(errors="replace")
    finally:
        proc.kill()
        os.close(master)


def test_terminal_shows_the_bar_and_train_log_keeps_the_loss_lines(
    tmp_path, tiny_dataset
):
    """On a terminal the bar is drawn, and its ETA never counts the slow first
    step; train.log still has every 'step N: loss' line."""
    argv = slow_first_cmd(tmp_path, tiny_dataset, logging__progress_bar="true")
    code, screen = run_in_terminal(argv)
    assert code == 0, screen[-3000:]
    assert "\r" in screen and re.search(r"train: +\d+%", screen), screen[-3000:]
    etas = re.findall(r"\d+/30 \[\d\d:\d\d<(\d\d):(\d\d)", screen)
    assert etas, screen[-3000:]
    # With the first step's SLOW seconds in its rate, the ETA after it would be
    # 29 x SLOW seconds.
    assert max(int(m) * 60 + int(s) for m, s in etas) < 60, etas
    assert "compiled in" in screen
    assert loss_lines(train_log(tmp_path)) == [10, 20, 30], train_log(tmp_path)


EXPECTED_SCRIPTS = {
    "slm-train": "src.train",
    "slm-data": "src.data",
    "slm-tokenizer": "src.tokenizer",
    "slm-chat": "src.inference",
    "slm-convert": "src.convert",
    "slm-eval": "src.eval",
}


def test_console_scripts_name_each_commands_main(capsys):
    """pyproject's [project.scripts] name every `python -m src.X` command, each
    target is that package's `main` (the one its __main__ runs), which reads
    sys.argv when called without arguments, as a console script calls it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(ROOT / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert set(scripts) == set(EXPECTED_SCRIPTS), scripts
    for name, target in scripts.items():
        module_name, _, attr = target.partition(":")
        module = importlib.import_module(module_name)
        main = getattr(module, attr)
        package = EXPECTED_SCRIPTS[name]
        dunder_main = (ROOT / package.replace(".", "/") / "__main__.py").read_text()
        assert module_name.startswith(package + "."), (name, target)
        assert f"from .{module_name.rsplit('.', 1)[1]} import {attr}" in dunder_main
        assert main(["--help"]) == 0, name
        old = sys.argv
        sys.argv = [name, "--help"]
        try:
            assert main() == 0, name
        finally:
            sys.argv = old
        assert f"python -m {package}" in capsys.readouterr().out


def test_installed_console_script_runs():
    """After `pip install -e .` the scripts sit beside the interpreter."""
    script = Path(sys.executable).parent / "slm-train"
    if not script.exists():
        pytest.skip("not installed: run `pip install -e .` (scripts/setup.sh does)")
    proc = subprocess.run(
        [str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--config" in proc.stdout, proc.stderr
