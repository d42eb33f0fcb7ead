"""A run's folders under issue 15's faults, through the real `python -m src.train`:
`--overwrite` over files a run did not write (item 1), two runs sharing a log
folder (item 2), a rewind to an older checkpoint (item 4), a full checkpoint disk
(item 6), Ctrl-C while the report is written (item 14) and a resume with nothing
left to train (item 16); and, under them all, that a saved checkpoint is never
replaced (the class of item 3) and that `latest` and `best` always tell the truth.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from src.checkpoint import store
from src.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
RUN = "tiny"
DEAD_PID = 99_999_999  # above any Linux pid_max, so never alive


def train_args(ck: Path, logs: Path, ds: dict, *extra: str, **kw) -> list[str]:
    values = {
        "data.train_path": ds["train"],
        "data.val_path": ds["val"],
        "data.tokenizer_path": ds["tokenizer"],
        "checkpoint.dir": ck,
        "logging.dir": logs,
        "logging.progress_bar": "false",
        "logging.interval": 5,
        "eval.max_tokens": 512,
        "eval.sample_tokens": 4,
        "eval.interval": 10,
        "checkpoint.interval": 10,
        "checkpoint.keep_last": 5,
        "training.max_steps": 20,
    }
    values.update({k.replace("__", "."): v for k, v in kw.items()})
    sets = [a for k, v in values.items() for a in ("--set", f"{k}={v}")]
    return ["--config", str(ROOT / "configs/tiny.yaml"), *sets, *extra]


def train_cmd(out: Path, ds: dict, *extra: str, prefix=("-m", "src.train"), **kw):
    """`python -m src.train` (or `prefix`) with checkpoints in out/ck, logs in
    out/logs (unless overridden)."""
    kw = {"ck": out / "ck", "logs": out / "logs", **kw}
    args = train_args(kw.pop("ck"), kw.pop("logs"), ds, *extra, **kw)
    return [sys.executable, *prefix, *args]


def run(out: Path, ds: dict, *extra: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(out, ds, *extra, **kw),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The one `error:` line of a user mistake (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def listing(folder: Path) -> dict[str, bytes | str | None]:
    """Every entry under `folder`: a file's bytes, a link's target, None for a dir
    (lock files aside: every run takes its locks)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.name == ".lock":
            continue
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = None
    return out


def train_steps(logs: Path) -> list[int]:
    rows = (logs / RUN / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, rows) if r["event"] == "train"]


def assert_links_true(run_dir: Path) -> None:
    """`latest` names the newest committed checkpoint; `best` and best.json the
    one with the lowest validation loss among them (none if none has one)."""
    committed = store.list_checkpoints(run_dir)
    assert os.readlink(run_dir / "latest") == committed[-1].name
    losses = {
        p.name: store.read_meta(p)["val_loss"]
        for p in committed
        if store.read_meta(p).get("val_loss") is not None
    }
    if not losses:
        assert not (run_dir / "best").is_symlink()
        assert not (run_dir / "best.json").exists()
        return
    best = min(losses, key=lambda name: (losses[name], name))
    assert os.readlink(run_dir / "best") == best
    record = json.loads((run_dir / "best.json").read_text())
    assert record == {"step": store.step_of(Path(best)), "metric": losses[best]}


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    """One run of 20 steps, validated and saved at steps 10 and 20: copied by the
    tests that start from an existing run."""
    out = tmp_path_factory.mktemp("trained")
    ok(run(out, tiny_dataset))
    return out


def copy_run(trained: Path, to: Path) -> Path:
    shutil.copytree(trained, to, symlinks=True)
    for lock in to.rglob(".lock"):
        lock.unlink()
    return to


# ------------------------------------------------------------------- item 1


def test_item1_overwrite_refuses_files_a_run_did_not_write(tmp_path, tiny_dataset):
    """--overwrite deletes only what a run writes; anything else in the run's
    folders (here one folder for checkpoints and logs) is named, and nothing is
    deleted."""
    shared = tmp_path / "runs"
    ok(run(tmp_path, tiny_dataset, ck=shared, logs=shared, training__max_steps=10))
    folder = shared / RUN
    (folder / "thesis.txt").write_text("three years of work")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.csv").write_text("1,2,3")
    (folder / "step_00000010" / "notes.txt").write_text("mine")
    before = listing(folder)

    proc = run(tmp_path, tiny_dataset, "--overwrite", ck=shared, logs=shared)
    line = refused(proc, "--overwrite", "nothing deleted", "thesis.txt", "sub/")
    assert "notes.txt" in line and "3 file(s)" in line
    assert listing(folder) == before

    # Without them, everything a run writes goes, leftovers and rewinds included.
    for name in ("thesis.txt", "sub", "step_00000010/notes.txt"):
        shutil.rmtree(folder / name) if name == "sub" else (folder / name).unlink()
    (folder / f".tmp-step_00000030-{DEAD_PID}").mkdir()
    shutil.copytree(folder / "step_00000010", folder / "rewound-1" / "step_00000020")
    (folder / ".report.md.0a1b2c3d.tmp").write_text("half a report")
    for tracker in ("tensorboard", "wandb/offline-run-1"):  # logging.report_to's
        (folder / tracker).mkdir(parents=True)
        (folder / tracker / "events").write_text("rows")
    ok(
        run(
            tmp_path,
            tiny_dataset,
            "--overwrite",
            ck=shared,
            logs=shared,
            training__max_steps=5,
            checkpoint__interval=5,
            eval__interval=5,
        )
    )
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".lock", "best", "best.json", "config.yaml", "latest",
                     "metrics.jsonl", "report.md", "step_00000005", "train.log",
                     "training.png"]  # fmt: skip
    assert train_steps(shared) == [1, 2, 3, 4, 5]
    assert_links_true(folder)


def test_item1_fresh_start_keeps_an_earlier_runs_logs(tmp_path, tiny_dataset):
    """Logs of a run that left no checkpoint are not emptied by a new start
    without --overwrite."""
    logs = tmp_path / "logs" / RUN
    logs.mkdir(parents=True)
    (logs / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    proc = run(tmp_path, tiny_dataset)
    refused(proc, str(logs), "metrics.jsonl", "--overwrite")
    assert (logs / "metrics.jsonl").read_text() == '{"event": "train", "step": 1}\n'


# ------------------------------------------------------------------- item 2


def test_item2_runs_sharing_a_log_folder(tmp_path, tiny_dataset):
    """Run B, with its own checkpoint folder but run A's log folder, is refused
    while A runs (even with --overwrite); A's logs stay whole."""
    logs = tmp_path / "logs"
    a = subprocess.Popen(
        train_cmd(tmp_path / "a", tiny_dataset, logs=logs, training__max_steps=100000,
                  eval__interval=0, checkpoint__interval=0),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        metrics = logs / RUN / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.stat().st_size):
            assert a.poll() is None and time.time() < deadline, a.stderr.read()
            time.sleep(0.05)
        proc = run(tmp_path / "b", tiny_dataset, "--overwrite", logs=logs)
        refused(proc, "in use by another trainer", str(logs / RUN), f"pid {a.pid}")
        assert metrics.exists()
    finally:
        a.send_signal(signal.SIGTERM)
        _, err = a.communicate(timeout=120)
    assert a.returncode == 0, err[-3000:]
    steps = train_steps(logs)
    assert steps == list(range(1, len(steps) + 1))
    assert "saved" in (logs / RUN / "train.log").read_text()
    assert store.list_checkpoints(tmp_path / "a" / "ck" / RUN)
    assert not store.step_folders(tmp_path / "b" / "ck" / RUN)


# ------------------------------------------------------------------- item 4


def test_item4_rewind_needs_the_flag_and_keeps_the_future(
    tmp_path, tiny_dataset, trained
):
    """Resuming from step 10 of a run that went to 20 is refused without
    --rewind, changing nothing; with it, step 20 is moved aside (not replaced),
    `latest`/`best` are true again, and the log has each step once."""
    out = copy_run(trained, tmp_path / "run")
    run_dir = out / "ck" / RUN
    old_20 = listing(run_dir / "step_00000020")
    before = listing(run_dir)

    target = str(run_dir / "step_00000010")
    refused(run(out, tiny_dataset, "--resume", target), "step_00000020", "--rewind")
    assert listing(run_dir) == before

    proc = ok(
        run(out, tiny_dataset, "--resume", target, "--rewind",
            training__learning_rate=0.03, training__max_steps=20)
    )  # fmt: skip
    assert "rewound to step 10" in proc.stderr and "step_00000020" in proc.stderr
    aside = [p for p in run_dir.iterdir() if p.name.startswith("rewound-")]
    assert len(aside) == 1 and listing(aside[0] / "step_00000020") == old_20
    store.verify_checkpoint(aside[0] / "step_00000020")
    new_20 = run_dir / "step_00000020"
    store.verify_checkpoint(new_20)
    assert store.read_meta(new_20)["config"]["training"]["learning_rate"] == 0.03
    assert_links_true(run_dir)
    assert train_steps(out / "logs") == list(range(1, 21))

    # --overwrite counts the rewound folder as the run's own.
    ok(run(out, tiny_dataset, "--overwrite", training__max_steps=10))
    assert not [p for p in run_dir.iterdir() if p.name.startswith("rewound-")]
    assert_links_true(run_dir)


def test_item4_rewind_resets_best_to_what_remains(tmp_path):
    """`best` names the best remaining checkpoint after a rewind, or nothing."""
    for step, loss in ((1, 3.0), (2, 2.0), (3, 1.0)):
        save(tmp_path, step, metric=loss)
    assert os.readlink(tmp_path / "best") == "step_00000003"
    aside, moved = store.set_aside(tmp_path, 1)
    assert moved == ["step_00000002", "step_00000003"]
    assert sorted(p.name for p in aside.iterdir()) == moved
    assert_links_true(tmp_path)
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 1
    (aside2, _) = store.set_aside(tmp_path, 0)
    assert not (tmp_path / "latest").is_symlink()
    assert (
        not (tmp_path / "best").is_symlink() and not (tmp_path / "best.json").exists()
    )
    assert aside2 != aside


# ----------------------------------------------- never replace (item 3's class)


def save(run_dir: Path, step: int, seed: int = 0, metric=None) -> Path:
    mx.random.seed(seed)
    weights = {"w": mx.random.normal((4, 4))}
    return store.save_checkpoint(
        run_dir, step, weights, {}, {"seed": seed, "val_loss": metric}, metric=metric
    )


def test_a_saved_checkpoint_is_never_replaced(tmp_path):
    first = save(tmp_path, 3, seed=0)
    before = listing(first)
    with pytest.raises(CheckpointError, match="step_00000003 already exists"):
        save(tmp_path, 3, seed=7)
    assert listing(first) == before
    (tmp_path / "step_00000004").mkdir()  # an empty folder is not replaced either
    with pytest.raises(CheckpointError, match="step_00000004 already exists"):
        save(tmp_path, 4)
    assert list((tmp_path / "step_00000004").iterdir()) == []
    assert not list(tmp_path.glob(".tmp-*"))


# ------------------------------------------------------------------- item 6

# `python -m src.train` on a disk that fills up during the second checkpoint:
# the optimizer file gets half its bytes, then the kernel's ENOSPC.
DISK_FULL = """
import errno, os, runpy, sys
import src  # the BLAS before MLX
import mlx.core as mx
real, calls = mx.save_safetensors, []
def save(path, arrays):
    calls.append(path)
    real(path, arrays)
    if len(calls) == 4:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
mx.save_safetensors = save
sys.argv[0] = "src.train"
runpy.run_module("src.train", run_name="__main__", alter_sys=True)
"""


def _disk_full_checks(proc, run_dir: Path) -> None:
    """C10: said as a full disk, naming the file; step 10 intact; no temp left."""
    refused(proc, "disk full", str(run_dir / "step_00000020"), "step_00000010")
    assert "Unable to write" not in proc.stderr and "Errno" not in proc.stderr
    assert [p.name for p in store.step_folders(run_dir)] == ["step_00000010"]
    store.verify_checkpoint(run_dir / "step_00000010")
    assert not list(run_dir.glob(".tmp-*"))
    assert_links_true(run_dir)


def test_item6_checkpoint_disk_full(tmp_path, tiny_dataset):
    proc = subprocess.run(
        train_cmd(tmp_path, tiny_dataset, prefix=("-c", DISK_FULL), eval__interval=0),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    _disk_full_checks(proc, tmp_path / "ck" / RUN)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (room for one tiny checkpoint, not two), if this machine
    lets us mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True, text=True,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_item6_checkpoint_disk_really_full(tmp_path, tiny_dataset, small_disk):
    """The same on a real full filesystem, where MLX's own writer fails."""
    proc = run(tmp_path, tiny_dataset, ck=small_disk, eval__interval=0)
    _disk_full_checks(proc, small_disk / RUN)


# ------------------------------------------------------------------ item 14

# `python -m src.train` whose report takes a second, saying when it starts.
SLOW_REPORT = """
import runpy, sys, time
import src.report
write = src.report.write_report
def slow(*args, **kwargs):
    print("writing the report", file=sys.stderr, flush=True)
    time.sleep(1.5)
    return write(*args, **kwargs)
src.report.write_report = slow
sys.argv[0] = "src.train"
runpy.run_module("src.train", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(
    "signals", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGINT]]
)
def test_item14_signal_while_the_report_is_written(tmp_path, tiny_dataset, signals):
    """One Ctrl-C or SIGTERM after the final save lets the report finish (exit 0,
    no traceback); a second Ctrl-C quits at once (130), the checkpoint valid."""
    proc = subprocess.Popen(
        train_cmd(tmp_path, tiny_dataset, prefix=("-c", SLOW_REPORT),
                  training__max_steps=10, eval__interval=0),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("writing the report"):
            for sig in signals:
                proc.send_signal(sig)
                time.sleep(0.2)
            break
    err = "".join(lines) + proc.stderr.read()
    proc.wait(timeout=60)
    assert "Traceback" not in err, err[-3000:]
    report = tmp_path / "logs" / RUN / "report.md"
    if len(signals) == 1:
        assert proc.returncode == 0, err[-3000:]
        assert report.exists() and "report:" in err
    else:
        assert proc.returncode == 130, err[-3000:]
        assert not report.exists()
    store.verify_checkpoint(tmp_path / "ck" / RUN / "step_00000010")


# ------------------------------------------------------------------ item 16


@pytest.mark.parametrize("max_steps", [5, 20])
def test_item16_resume_with_nothing_left_to_train(
    tmp_path, tiny_dataset, trained, max_steps
):
    """max_steps at or below the checkpoint's step: refused before anything is
    allocated or written, saying both numbers and what to set."""
    out = copy_run(trained, tmp_path / "run")
    before = listing(out)
    proc = run(out, tiny_dataset, "--resume", "auto", training__max_steps=max_steps)
    refused(proc, "step 20", f"training.max_steps={max_steps}", "above 20")
    assert listing(out) == before


@pytest.mark.parametrize("missing", ["data.tokenizer_path", "data.train_path"])
def test_bad_inputs_create_no_run_folders(tmp_path, tiny_dataset, missing):
    """Bad input is refused before anything is written: a missing tokenizer or
    token file leaves no checkpoint or log folder (nor a lock file) behind."""
    proc = run(tmp_path, tiny_dataset, **{missing.replace(".", "__"): tmp_path / "no"})
    refused(proc, str(tmp_path / "no"))
    assert not (tmp_path / "ck").exists() and not (tmp_path / "logs").exists()
