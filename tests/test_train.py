"""The trainer through its real CLI: learning, exact resume, and the faults of
../shared/FAULTS.md (C2, C4, C5, C8, C11-C14, N1, V2) on a tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from src.backend.policy import BFS_WIDTH, BFS_WIDTH_VAR

ROOT = Path(__file__).resolve().parents[1]


def overrides(tmp_path: Path, ds: dict, **kw) -> list[str]:
    values = {
        "data.train_path": ds["train"],
        "data.val_path": ds["val"],
        "data.tokenizer_path": ds["tokenizer"],
        "checkpoint.dir": tmp_path / "ck",
        "logging.dir": tmp_path / "logs",
        "logging.progress_bar": "false",
        "logging.interval": 5,
        "eval.max_tokens": 1024,
        "eval.sample_tokens": 8,
        "model.dropout": 0.1,
        "training.max_steps": 40,
        "eval.interval": 20,
        "checkpoint.interval": 20,
    }
    values.update({k.replace("__", "."): v for k, v in kw.items()})
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def cmd(tmp_path, ds, *extra, **kw) -> list[str]:
    return [
        sys.executable,
        "-m",
        "src.train",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        *overrides(tmp_path, ds, **kw),
        *extra,
    ]


def run(tmp_path, ds, *extra, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd(tmp_path, ds, *extra, **kw),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def rows(tmp_path, run_name="tiny", event="train") -> list[dict]:
    path = tmp_path / "logs" / run_name / "metrics.jsonl"
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in out if r["event"] == event]


def losses(tmp_path, run_name="tiny") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(tmp_path, run_name)}


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_learns_and_writes_everything(tmp_path, tiny_dataset):
    proc = ok(
        run(
            tmp_path,
            tiny_dataset,
            training__max_steps=120,
            eval__interval=60,
            checkpoint__interval=60,
            model__dropout=0.0,
        )
    )
    assert "BLAS:" in proc.stderr and "parameters" in proc.stderr
    if mx.default_device().type == mx.DeviceType.cpu:  # the execution policy, applied
        assert f"{BFS_WIDTH_VAR}={BFS_WIDTH}" in proc.stderr
    loss = losses(tmp_path)
    assert sorted(loss) == list(range(1, 121))
    first, last = (
        sum(loss[s] for s in range(1, 6)) / 5,
        sum(loss[s] for s in range(116, 121)) / 5,
    )
    assert last < first - 1.5, (first, last)  # from ~ln(512)=6.2 to well below
    evals = rows(tmp_path, event="eval")
    assert [e["step"] for e in evals] == [60, 120]
    assert evals[1]["val_loss"] < evals[0]["val_loss"] and 0 < evals[1]["val_bpb"] < 8
    run_dir = tmp_path / "ck" / "tiny"
    assert (run_dir / "step_00000120" / "COMMIT").exists()
    assert (run_dir / "latest").resolve().name == "step_00000120"
    assert (run_dir / "best").resolve().name == "step_00000120"
    meta = json.loads((run_dir / "step_00000120" / "meta.json").read_text())
    assert meta["step"] == 120 and meta["config"]["model"]["d_model"] == 64
    assert (run_dir / "step_00000120" / "tokenizer" / "tokenizer.model").exists()
    assert (tmp_path / "logs" / "tiny" / "config.yaml").exists()
    assert rows(tmp_path, event="sample")
    # the checkpoint alone is enough to generate
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.inference",
            "--checkpoint",
            str(run_dir / "best"),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "12",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert gen.returncode == 0 and gen.stdout.startswith("Once upon a time"), gen.stderr


def wait_for_rows(tmp_path, n, proc, timeout=120):
    path = tmp_path / "logs" / "tiny" / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"trainer exited early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("trainer produced no metrics in time")


def test_sigterm_saves_and_resume_is_exact(tmp_path, tiny_dataset):
    """C2: SIGTERM mid-run saves at the step boundary, exits 0; resuming gives the
    uninterrupted run's loss at every step, bit for bit (CPU)."""
    base, cut = tmp_path / "base", tmp_path / "cut"
    ok(run(base, tiny_dataset, training__max_steps=150, checkpoint__interval=0))
    proc = subprocess.Popen(
        cmd(cut, tiny_dataset, training__max_steps=150, checkpoint__interval=0),
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_rows(cut, 12, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    saved = [p.name for p in (cut / "ck" / "tiny").glob("step_*")]
    assert len(saved) == 1 and saved[0] != "step_00000150", saved
    ok(
        run(
            cut,
            tiny_dataset,
            "--resume",
            "auto",
            training__max_steps=150,
            checkpoint__interval=0,
        )
    )
    assert losses(cut) == losses(base)  # every step 1..150, exactly


def test_kill9_between_saves_resumes_without_gaps(tmp_path, tiny_dataset):
    """C4: kill -9 after a checkpoint; resume from it; the log has each step once."""
    proc = subprocess.Popen(
        cmd(
            tmp_path,
            tiny_dataset,
            training__max_steps=4000,
            checkpoint__interval=10,
            eval__interval=0,
        ),
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for_rows(tmp_path, 27, proc)
    proc.kill()
    proc.wait()
    ok(
        run(
            tmp_path,
            tiny_dataset,
            "--resume",
            "auto",
            training__max_steps=60,
            checkpoint__interval=10,
            eval__interval=0,
        )
    )
    steps = [r["step"] for r in rows(tmp_path)]
    assert steps == list(range(1, 61)), steps


def test_same_seed_same_curve_other_seed_differs(tmp_path, tiny_dataset):
    """C14."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 1), (b, 1), (c, 2)):
        ok(
            run(
                d,
                tiny_dataset,
                training__max_steps=10,
                training__seed=seed,
                eval__interval=0,
                checkpoint__interval=0,
            )
        )
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, tiny_dataset):
    """C5: a flipped byte in the newest weights is detected; resume uses the previous."""
    ok(
        run(
            tmp_path,
            tiny_dataset,
            training__max_steps=20,
            checkpoint__interval=10,
            eval__interval=0,
        )
    )
    weights = tmp_path / "ck" / "tiny" / "step_00000020" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = ok(
        run(
            tmp_path,
            tiny_dataset,
            "--resume",
            "auto",
            training__max_steps=30,
            checkpoint__interval=10,
            eval__interval=0,
        )
    )
    assert "model.safetensors" in proc.stderr and "step_00000010" in proc.stderr
    assert "resumed from" in proc.stderr and "at step 10" in proc.stderr


def test_resume_refuses_changed_shape(tmp_path, tiny_dataset):
    """C8: listed with old and new values, before allocating anything."""
    ok(run(tmp_path, tiny_dataset, training__max_steps=5, eval__interval=0))
    proc = run(
        tmp_path,
        tiny_dataset,
        "--resume",
        "auto",
        model__d_model=128,
        training__batch_size=4,
    )
    assert proc.returncode == 2
    assert "model.d_model: checkpoint 64 -> now 128" in proc.stderr
    assert "training.batch_size: checkpoint 8 -> now 4" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_user_errors_exit_2_without_traceback(tmp_path, tiny_dataset):
    # C12: nothing to resume: the run's only checkpoint folder is damaged
    # (`--resume auto` on a run without any starts it: test_resume_extend.py)
    c12 = tmp_path / "c12"
    (c12 / "ck" / "tiny" / "step_00000005").mkdir(parents=True)
    proc = run(c12, tiny_dataset, "--resume", "auto")
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr
    # C11: output directory that cannot be created
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run(tmp_path, tiny_dataset, checkpoint__dir=blocker / "ck")
    assert proc.returncode == 2 and "not writable" in proc.stderr
    # V2: a corrupt token file is named at start-up
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"garbage" * 10)
    proc = run(tmp_path, tiny_dataset, data__train_path=bad)
    assert proc.returncode == 2 and "bad.bin" in proc.stderr
    # an existing run is not silently overwritten
    ok(run(tmp_path, tiny_dataset, training__max_steps=2, eval__interval=0))
    proc = run(tmp_path, tiny_dataset, training__max_steps=2)
    assert proc.returncode == 2 and "--resume auto" in proc.stderr
    for p in (proc,):
        assert "Traceback" not in p.stderr


def test_second_trainer_on_same_run_is_refused(tmp_path, tiny_dataset):
    """C13: the lock is held by a live process; a stale lock file does not block."""
    from src.train.lock import RunLock

    run_dir = tmp_path / "ck" / "tiny"
    run_dir.mkdir(parents=True)
    with RunLock(run_dir):
        proc = run(tmp_path, tiny_dataset, training__max_steps=2)
    assert proc.returncode == 2 and "in use" in proc.stderr
    (run_dir / ".lock").write_text("999999\n")  # stale: no such process holds it
    ok(run(tmp_path, tiny_dataset, training__max_steps=2, eval__interval=0))


@pytest.mark.slow
def test_quickstart_script_end_to_end(tmp_path, tiny_corpus):
    """The README's first command, on configs/tiny.yaml and the test corpus, in a
    copy of the repo (so the test writes nothing into the checkout)."""
    corpus = tiny_corpus
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("src", "configs", "scripts", "pyproject.toml"):
        os.symlink(ROOT / name, work / name)
    os.symlink(ROOT / ".venv", work / ".venv")
    proc = subprocess.run(
        [
            "bash",
            "scripts/quickstart.sh",
            "--skip-setup",
            "--config",
            "configs/tiny.yaml",
            "--data",
            str(corpus),
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("---") == 3 and "Once upon a time" in proc.stdout
    assert (work / "checkpoints" / "tiny" / "latest" / "COMMIT").exists()


def test_ctrl_c_twice_exits_at_once(tmp_path, tiny_dataset):
    """C3: a second Ctrl-C during the save that the first one started exits at once
    (130); the checkpoints committed before stay valid. The model is big enough
    (~80 MB of checkpoint) that the save is still running when the second arrives."""
    import threading

    from src.checkpoint.store import list_checkpoints, verify_checkpoint

    proc = subprocess.Popen(
        cmd(
            tmp_path,
            tiny_dataset,
            training__max_steps=100000,
            checkpoint__interval=10,
            eval__interval=0,
            model__d_model=384,
            model__n_layers=4,
        ),
        cwd=ROOT,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    wait_for_rows(tmp_path, 12, proc)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 60
    while (
        not any("received SIGINT" in line for line in lines) and time.time() < deadline
    ):
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    assert proc.returncode == 130, "".join(lines)[-2000:]
    saved = list_checkpoints(tmp_path / "ck" / "tiny")
    assert saved and saved[0].name == "step_00000010"
    for path in saved:
        verify_checkpoint(path)


def test_inference_refuses_other_vocabulary(tmp_path, tiny_dataset, tiny_corpus):
    """V3: a tokenizer with another vocabulary is refused, with both sizes."""
    from src.tokenizer import cli as tokenizer

    ok(run(tmp_path, tiny_dataset, training__max_steps=2, eval__interval=0))
    other = tmp_path / "tok400"
    assert (
        tokenizer.main(
            [
                "train",
                "--input",
                str(tiny_corpus),
                "--output",
                str(other),
                "--vocab-size",
                "400",
            ]
        )
        == 0
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.inference",
            "--checkpoint",
            str(tmp_path / "ck" / "tiny" / "latest"),
            "--tokenizer",
            str(other),
            "--prompt",
            "Hi",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        "400" in proc.stderr and "512" in proc.stderr and "Traceback" not in proc.stderr
    )
