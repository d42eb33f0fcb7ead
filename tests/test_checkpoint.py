"""Checkpoint faults C1, C5-C7, C9-C13 and N1, on tiny arrays in tmp_path."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from src.checkpoint import store as ckpt
from src.checkpoint.store import (
    CheckpointError,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)
from src.files import atomic_file, check_creatable, check_writable
from src.train.lock import RunLock

REPO = Path(__file__).resolve().parents[1]
DEAD_PID = 99_999_999  # above any Linux pid_max, so never alive


def make_state(seed: int = 0):
    mx.random.seed(seed)
    weights = {
        "embed.weight": mx.random.normal((8, 4)),
        "layers.0.attn.q_proj.weight": mx.random.normal((4, 4)).astype(mx.bfloat16),
        "layers.0.norm.weight": mx.ones((4,)),
    }
    optimizer = {"step": mx.array(seed, dtype=mx.int32), "m.embed": mx.zeros((8, 4))}
    return weights, optimizer


def save(run, step, seed=0, **kw):
    weights, optimizer = make_state(seed)
    return save_checkpoint(run, step, weights, optimizer, {"seed": seed}, **kw)


def bits(a: mx.array) -> bytes:
    """Raw bytes of an array (bf16 viewed as uint16, since numpy has no bf16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a).tobytes()


def tmp_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob(".tmp-*"))


def step_names(run: Path) -> list[str]:
    return [p.name for p in list_checkpoints(run)]


def test_round_trip_is_bitwise_and_self_contained(tmp_path):
    tok = tmp_path / "tok"
    (tok / "subdir").mkdir(parents=True)
    (tok / "tokenizer.model").write_bytes(b"\x00sentencepiece\xff")
    (tok / "vocab.txt").write_text("a\nb\n")
    run = tmp_path / "run"
    weights, optimizer = make_state(3)
    meta = {"config": {"d_model": 4}, "data_position": 123}
    path = save_checkpoint(run, 5, weights, optimizer, meta, tokenizer_dir=tok)

    assert path == run / "step_00000005"
    verify_checkpoint(path)
    w2, o2, meta2 = load_checkpoint(path)
    for got, want in ((w2, weights), (o2, optimizer)):
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype, k
            assert bits(got[k]) == bits(want[k]), k
    assert meta2 == {**meta, "step": 5} == read_meta(path)
    assert (path / "tokenizer" / "tokenizer.model").read_bytes() == (
        tok / "tokenizer.model"
    ).read_bytes()
    assert (path / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert not (path / "tokenizer" / "subdir").exists()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["step"] == 5
    assert set(manifest["files"]) == {
        "model.safetensors",
        "optimizer.safetensors",
        "meta.json",
        "tokenizer/tokenizer.model",
        "tokenizer/vocab.txt",
    }
    assert (path / "COMMIT").is_file()
    assert os.readlink(run / "latest") == "step_00000005"
    assert resolve_resume(str(run / "latest"), run) == path.resolve()


def test_empty_optimizer_state_round_trips(tmp_path):
    weights, _ = make_state()
    path = save_checkpoint(tmp_path, 1, weights, {}, {})
    _, opt, meta = load_checkpoint(path)
    assert opt == {} and meta == {"step": 1}


def _flip_byte(path):
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: safetensors itself would not notice
    f.write_bytes(bytes(data))
    return "model.safetensors", "checksum mismatch"


def _truncate(path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "model.safetensors", "truncated"


def _delete_file(path):
    (path / "optimizer.safetensors").unlink()
    return "optimizer.safetensors", "missing"


def _delete_commit(path):
    (path / "COMMIT").unlink()
    return "step_00000002", "incomplete"


@pytest.mark.parametrize(
    "damage", [_flip_byte, _truncate, _delete_file, _delete_commit]
)
def test_damaged_newest_falls_back_with_warning(tmp_path, damage):
    """C5, C6, C7: the damage is named and the previous checkpoint is used."""
    first = save(tmp_path, 1)
    newest = save(tmp_path, 2, seed=1)
    fname, words = damage(newest)

    with pytest.raises(CheckpointError, match=fname) as info:
        verify_checkpoint(newest)
    assert words in str(info.value)
    warnings = []
    assert find_latest_valid(tmp_path, warn=warnings.append) == first
    assert len(warnings) == 1
    assert fname in warnings[0] and words in warnings[0]
    assert "falling back to" in warnings[0] and str(first) in warnings[0]
    assert resolve_resume("auto", tmp_path, warn=warnings.append) == first
    with pytest.raises(CheckpointError, match=fname):
        load_checkpoint(newest)


def test_list_ignores_uncommitted_dirs_and_sorts_by_step(tmp_path):
    for step in (10, 9, 100):
        save(tmp_path, step, keep_last=0)
    (tmp_path / "step_00000200").mkdir()  # no COMMIT: not a checkpoint
    (tmp_path / "step_00000200" / "model.safetensors").write_bytes(b"x")
    assert step_names(tmp_path) == ["step_00000009", "step_00000010", "step_00000100"]


def test_nothing_to_resume(tmp_path):
    """C12."""
    with pytest.raises(CheckpointError, match="nothing to resume"):
        resolve_resume("auto", tmp_path / "empty")
    missing = tmp_path / "no" / "such" / "step_00000001"
    with pytest.raises(CheckpointError, match=str(missing)):
        resolve_resume(str(missing), tmp_path)
    assert find_latest_valid(tmp_path) is None


def test_leftover_tmp_dir_ignored_then_cleaned(tmp_path):
    first = save(tmp_path, 1)
    dead = tmp_path / f".tmp-step_00000002-{DEAD_PID}"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half a file")
    live = tmp_path / f".tmp-step_00000002-{os.getppid()}"  # a live writer's
    live.mkdir()

    assert list_checkpoints(tmp_path) == [first]
    assert find_latest_valid(tmp_path, warn=pytest.fail) == first
    save(tmp_path, 2)
    assert not dead.exists()
    assert live.exists()


def test_retention_keeps_newest_three_plus_best(tmp_path):
    """C9: 10 saves, best at step 2; only old ones beyond newest 3 + best go."""
    metrics = [5.0, 1.0, 4.0, 3.0, 2.0, 2.5, 1.5, 3.5, 1.2, 9.0]
    for step, metric in enumerate(metrics, start=1):
        save(tmp_path, step, keep_last=3, metric=metric)
        assert len(list_checkpoints(tmp_path)) <= 4
    assert step_names(tmp_path) == [f"step_{s:08d}" for s in (2, 8, 9, 10)]
    assert os.readlink(tmp_path / "best") == "step_00000002"
    assert os.readlink(tmp_path / "latest") == "step_00000010"
    assert read_meta(tmp_path / "best")["step"] == 2
    assert json.loads((tmp_path / "best.json").read_text())["metric"] == 1.0
    assert tmp_dirs(tmp_path) == []
    for p in list_checkpoints(tmp_path):
        verify_checkpoint(p)

    save(tmp_path, 11, keep_last=3, metric=0.5)  # a new best: step 2 may now go
    assert step_names(tmp_path) == [f"step_{s:08d}" for s in (9, 10, 11)]
    assert os.readlink(tmp_path / "best") == "step_00000011"


def test_a_committed_step_is_never_replaced(tmp_path):
    """Issue 15 item 3's class: a second save of a step that exists is refused;
    the first stays, bit for bit."""
    path = save(tmp_path, 3, seed=0)
    with pytest.raises(CheckpointError, match="already exists"):
        save(tmp_path, 3, seed=7)
    verify_checkpoint(path)
    weights, _ = make_state(0)
    got, opt, meta = load_checkpoint(path)
    assert bits(got["embed.weight"]) == bits(weights["embed.weight"])
    assert meta["seed"] == 0 and opt["step"].item() == 0
    assert step_names(tmp_path) == ["step_00000003"]
    assert tmp_dirs(tmp_path) == []


@pytest.mark.parametrize("where", ["weights", "optimizer"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_never_written(tmp_path, where, bad):
    """N1: refused before anything is written; the previous checkpoint stays latest."""
    first = save(tmp_path, 1)
    weights, optimizer = make_state()
    target = weights if where == "weights" else optimizer
    name = {"weights": "layers.0.attn.q_proj.weight", "optimizer": "m.embed"}[where]
    target[name] = target[name].at[0].add(bad)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        save_checkpoint(tmp_path, 2, weights, optimizer, {})
    assert list_checkpoints(tmp_path) == [first]
    assert os.readlink(tmp_path / "latest") == first.name
    assert tmp_dirs(tmp_path) == [] and not (tmp_path / "step_00000002").exists()


def _mlx_write_fails(monkeypatch):
    real = mx.save_safetensors

    def half_then_fail(path, arrays):
        real(path, arrays)
        Path(path).write_bytes(Path(path).read_bytes()[:10])
        raise RuntimeError("[write] Unable to write 4096 bytes to file.")  # as MLX does

    monkeypatch.setattr(mx, "save_safetensors", half_then_fail)
    return "Unable to write"


def _meta_write_fails(monkeypatch):
    real = ckpt.write_bytes

    def fail_on_meta(path, data):
        if path.name == "meta.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(ckpt, "write_bytes", fail_on_meta)
    return "disk full"


@pytest.mark.parametrize("fail", [_mlx_write_fails, _meta_write_fails])
def test_disk_full_during_save(tmp_path, monkeypatch, fail):
    """C10: the error names the path; previous checkpoint intact; no temp left."""
    first = save(tmp_path, 1)
    words = fail(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 2)
    assert str(tmp_path / "step_00000002") in str(info.value)
    assert words in str(info.value)
    monkeypatch.undo()
    verify_checkpoint(first)
    assert find_latest_valid(tmp_path, warn=pytest.fail) == first
    assert os.readlink(tmp_path / "latest") == first.name
    assert tmp_dirs(tmp_path) == [] and not (tmp_path / "step_00000002").exists()


def test_atomic_file_whole_or_absent_and_never_replacing(tmp_path):
    """A failed write leaves nothing; replace=False never replaces a file, even
    one made while the temp file was written."""
    path = tmp_path / "out.bin"
    with pytest.raises(OSError, match="the disk went away"):
        with atomic_file(path) as f:
            f.write(b"half")
            raise OSError("the disk went away")
    assert list(tmp_path.iterdir()) == []
    with atomic_file(path, replace=False) as f:
        f.write(b"first")
    with pytest.raises(FileExistsError):
        with atomic_file(path, replace=False) as f:
            f.write(b"second")
    assert path.read_bytes() == b"first" and list(tmp_path.iterdir()) == [path]
    with atomic_file(path) as f:  # the default replaces, atomically
        f.write(b"third")
    assert path.read_bytes() == b"third" and list(tmp_path.iterdir()) == [path]


def test_check_creatable_creates_nothing(tmp_path):
    assert check_creatable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="afile is not a folder"):
        check_creatable(tmp_path / "afile" / "sub")


def test_check_writable(tmp_path):
    """C11: a missing dir is created; an unwritable one fails at once, named."""
    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and list(
        (tmp_path / "a" / "b").iterdir()
    ) == []

    if os.geteuid() == 0:  # root ignores chmod: a path under a regular file fails
        (tmp_path / "afile").write_text("x")
        bad = tmp_path / "afile" / "sub"
    else:
        bad = tmp_path / "readonly"
        bad.mkdir(mode=0o500)
    try:
        with pytest.raises(CheckpointError, match=str(bad)):
            check_writable(bad)
    finally:
        if bad.is_dir():
            bad.chmod(0o700)


LOCK_SCRIPT = textwrap.dedent(
    """
    import sys
    from src.errors import CheckpointError
    from src.train.lock import RunLock
    try:
        with RunLock(sys.argv[1]):
            pass
    except CheckpointError as e:
        sys.exit(f"locked: {e}")
    """
)


def _try_lock(run):
    return subprocess.run(
        [sys.executable, "-c", LOCK_SCRIPT, str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_run_lock_refuses_a_second_trainer(tmp_path):
    """C13: a second process is refused while the first holds the lock."""
    with RunLock(tmp_path):
        res = _try_lock(tmp_path)
        assert res.returncode != 0
        assert "in use by another trainer" in res.stderr
        assert f"pid {os.getpid()}" in res.stderr
        with pytest.raises(CheckpointError, match="in use"):  # same process, too
            RunLock(tmp_path).acquire()
    res = _try_lock(tmp_path)
    assert res.returncode == 0, res.stderr


def test_stale_lock_file_does_not_block(tmp_path):
    (tmp_path / ".lock").write_text(f"{DEAD_PID}\n")
    lock = RunLock(tmp_path).acquire()
    try:
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    finally:
        lock.release()
    RunLock(tmp_path).acquire().release()  # released: can be taken again


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import mlx.core as mx
    from src.checkpoint import store as ckpt

    run, mode = sys.argv[1], sys.argv[2]
    if mode == "hook":  # stop deterministically with a half-written manifest
        real = ckpt.write_bytes
        def slow(path, data):
            if path.name == "manifest.json":
                path.write_bytes(data[: len(data) // 2])
                print("ready", flush=True)
                time.sleep(60)
            real(path, data)
        ckpt.write_bytes = slow
    weights = {f"w{i}": mx.random.normal((1000, 1250)) for i in range(4)}  # 20 MB
    mx.eval(weights)
    print("saving", flush=True)
    ckpt.save_checkpoint(run, 2, weights, {}, {"seed": 0})
    """
)


@pytest.mark.parametrize("mode", ["poll", "hook"])
def test_kill_9_during_save_keeps_previous(tmp_path, mode):
    """C1: SIGKILL mid-save; step 1 is what resume picks; the debris is cleaned."""
    first = save(tmp_path, 1)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path), mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    tmp = tmp_path / f".tmp-step_00000002-{proc.pid}"
    try:
        if mode == "hook":
            while proc.stdout.readline().strip() not in ("ready", ""):
                pass
        else:
            assert proc.stdout.readline().strip() == "saving"
            deadline = time.monotonic() + 30
            while not tmp.exists() and time.monotonic() < deadline:
                time.sleep(0.0005)
        assert proc.poll() is None, "the writer finished before it could be killed"
        assert tmp.exists()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert not (tmp_path / "step_00000002").exists()
    assert list_checkpoints(tmp_path) == [first]
    assert find_latest_valid(tmp_path, warn=pytest.fail) == first
    assert resolve_resume("auto", tmp_path) == first
    verify_checkpoint(first)
    save(tmp_path, 3)
    assert tmp_dirs(tmp_path) == []
    assert step_names(tmp_path) == ["step_00000001", "step_00000003"]
