"""Data-parallel training with 2 ranks on 127.0.0.1 (ring backend, CPU): the
equivalence with one process, and faults D1-D8 of ../shared/FAULTS.md. Ranks are
started by `--nproc`, by `mlx.launch`, or by hand (MLX_RANK / MLX_HOSTFILE) when a
test needs to act on one rank without the launcher's help."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Ranks must connect and fail within seconds: run alone (scripts/test.sh).
pytestmark = pytest.mark.serial

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40  # long enough that a signal sent at step 5 lands mid-run


def settings(out: Path, ds: dict, **kw) -> list[str]:
    values = {
        "data.train_path": ds["train"],
        "data.val_path": ds["val"],
        "data.tokenizer_path": ds["tokenizer"],
        "checkpoint.dir": out / "ck",
        "logging.dir": out / "logs",
        "logging.progress_bar": "false",
        "logging.interval": 5,
        "model.dropout": 0.0,
        # one stream everywhere: auto gives one process 2 CPU streams and each of
        # 2 ranks 1, and the reduction-order noise (1e-7) grows to 1e-4 in 40 steps
        "training.streams": 1,
        "training.grad_accum_steps": 2,
        "training.max_steps": STEPS,
        "eval.max_tokens": 1024,
        "eval.sample_tokens": 8,
        "eval.interval": 20,
        "checkpoint.interval": 20,
    }
    values.update({k.replace("__", "."): v for k, v in kw.items()})
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def trainer(out, ds, *extra, **kw) -> list[str]:
    return [
        sys.executable,
        "-m",
        "src.train",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        *settings(out, ds, **kw),
        *extra,
    ]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_leftovers():
    """A failed test leaves no process running (a --nproc launcher killed -9 takes
    its ranks with it: that is D4)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(args, out: Path, env=None, name="stderr") -> subprocess.Popen:
    """Popen with stderr to out/<name>.txt (read it with `err`)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.txt", "w") as f:
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=f, text=True
        )
    STARTED.append(proc)
    return proc


def err(out: Path, name="stderr") -> str:
    return (out / f"{name}.txt").read_text()


def finish(proc, timeout=120) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{proc.args[:4]}... still running after {timeout} s")


def rows(out: Path, event="train") -> list[dict]:
    path = out / "logs" / "tiny" / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    whole = [line for line in lines if line.endswith("}")]  # one may be mid-write
    return [r for r in map(json.loads, whole) if r["event"] == event]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(out)}


def wait_for(cond, what: str, timeout=60.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def rank_pids(out: Path) -> list[int]:
    """The rank pids that `--nproc` prints when it has started them."""
    wait_for(lambda: "launched" in err(out), "the launcher's pid line")
    return [int(p) for p in re.findall(r"rank \d+ pid (\d+)", err(out))]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a zombie nobody reaped is not running
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def by_hand(out, ds, ranks, extra=(), **kw) -> list[subprocess.Popen]:
    """Start ranks of a 2-rank ring without a launcher: `ranks` maps a rank to its
    SLM_JOB_ID and its own config overrides; `kw` are everyone's overrides."""
    from src.train.launch import free_ports

    hostfile = out / "hosts.json"
    out.mkdir(parents=True, exist_ok=True)
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
    procs = []
    for r, (job, own) in ranks.items():
        env = dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile))
        env["SLM_JOB_ID"] = job
        cmd = trainer(out, ds, *extra, **{**kw, **own})
        procs.append(start(cmd, out, env, f"rank{r}"))
    return procs


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_dataset):
    """Three runs at once: 2 ranks via --nproc, the same config on one process
    (grad_accum 2 there, 1 per rank), and a second 2-rank job (other seed) that
    shares the machine with the first (D5: each job its own ports)."""
    base = tmp_path_factory.mktemp("baseline")
    two, one, other = base / "two", base / "one", base / "other"
    procs = [
        start(trainer(two, tiny_dataset, "--nproc", "2"), two),
        # one BLAS thread, as each of 2 ranks gets from --nproc: OpenBLAS sums
        # some products in another order with 2 threads than with 1 (the 1e-7
        # difference grows to 1e-4 in 40 steps too)
        start(
            trainer(one, tiny_dataset),
            one,
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
        ),
        start(trainer(other, tiny_dataset, "--nproc", "2", training__seed=7), other),
    ]
    for proc, out in zip(procs, (two, one, other)):
        assert finish(proc, timeout=240) == 0, err(out)[-3000:]
    return {"two": two, "one": one, "other": other}


def test_two_ranks_train_like_one_process(baseline):
    """D1: the same config on 2 ranks and on 1 process gives the same loss curve
    (1e-5), validation and final weights; ranks are bitwise identical at every
    checkpoint; only rank 0 writes (each metrics row and sample once). D8: the
    checkpoints rank 0 wrote verify, and record the world size."""
    import mlx.core as mx

    from src.checkpoint.store import list_checkpoints, verify_checkpoint

    two, one = baseline["two"], baseline["one"]
    a, b = losses(one), losses(two)
    assert sorted(b) == list(range(1, STEPS + 1))  # each step once: one writer
    diff = max(abs(a[s] - b[s]) for s in a)
    assert sorted(a) == sorted(b) and diff < 1e-5, f"max loss diff {diff:.3g}"
    va, vb = rows(one, "eval"), rows(two, "eval")
    assert [r["step"] for r in vb] == [20, 40]
    assert all(abs(x["val_loss"] - y["val_loss"]) < 1e-5 for x, y in zip(va, vb))
    assert len(rows(two, "sample")) == 2
    text = err(two)
    for s in (20, 40):
        assert re.search(rf"ranks in sync at step {s}: .* on all 2 ranks", text), text
    assert "data-parallel: 2 ranks, 1 x 8 windows each per step" in text
    saved = list_checkpoints(two / "ck" / "tiny")
    assert [p.name for p in saved] == ["step_00000020", "step_00000040"]
    for path in saved:
        verify_checkpoint(path)
        assert json.loads((path / "meta.json").read_text())["world_size"] == 2
    wa = mx.load(str(one / "ck" / "tiny" / "latest" / "model.safetensors"))
    wb = mx.load(str(saved[-1] / "model.safetensors"))
    worst = max(mx.abs(wa[k] - wb[k]).max().item() for k in wa)
    assert worst < 1e-5, f"max weight diff {worst:.3g}"
    # D5: the 2-rank job beside it (its own ports) trained on its own
    other = losses(baseline["other"])
    assert sorted(other) == list(range(1, STEPS + 1)) and other[1] != b[1]


def test_checksum_sees_one_flipped_bit():
    """The check behind 'ranks in sync' (D1) can fail."""
    import mlx.core as mx
    import numpy as np

    from src.train.distributed import checksum

    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    flipped = w.copy()
    flipped.view(np.uint32)[3, 5] ^= 1 << 7
    tree = {"a": mx.array(w), "b": [mx.ones((3,), mx.bfloat16)]}
    assert checksum(tree) == checksum({"a": mx.array(w.copy()), "b": tree["b"]})
    assert checksum(tree) != checksum({"a": mx.array(flipped), "b": tree["b"]})


def test_accumulation_must_split_over_ranks(tmp_path, tiny_dataset):
    proc = subprocess.run(
        trainer(tmp_path, tiny_dataset, "--nproc", "2", training__grad_accum_steps=3),
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "grad_accum_steps=3 is not divisible by the number of ranks (2)" in (
        proc.stderr
    )


def test_rank_death_fails_the_others_within_seconds(tmp_path, tiny_dataset):
    """D2 without a launcher: rank 1 is killed -9 mid-run; rank 0 exits non-zero
    within seconds by itself, with a clear message."""
    r0, r1 = by_hand(
        tmp_path, tiny_dataset, {0: ("j", {}), 1: ("j", {})}, training__max_steps=5000
    )
    wait_for(lambda: rows(tmp_path), "rank 0's first metrics")
    r1.kill()
    t0 = time.time()
    code = finish(r0, timeout=30)
    assert code == 3 and time.time() - t0 < 10, err(tmp_path, "rank0")[-2000:]
    assert "lost the connection to another rank" in err(tmp_path, "rank0")
    assert "Traceback" not in err(tmp_path, "rank0")


def test_rank_death_fails_the_launcher(tmp_path, tiny_dataset):
    """D2 through --nproc: the command's exit status is non-zero, in seconds."""
    proc = start(trainer(tmp_path, tiny_dataset, "--nproc", "2",
                         training__max_steps=5000), tmp_path)  # fmt: skip
    pids = rank_pids(tmp_path)
    wait_for(lambda: rows(tmp_path), "the first metrics")
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.time()
    assert finish(proc, timeout=30) != 0
    assert time.time() - t0 < 10 and not alive(pids[0])


def test_sigterm_to_one_rank_stops_all_and_resumes_exactly(
    tmp_path, tiny_dataset, baseline
):
    """D3: SIGTERM to rank 1 only: both ranks stop after the same step, rank 0
    saves once, the job exits 0; resuming on 2 ranks gives the uninterrupted
    2-rank run's loss at every step, bit for bit."""
    proc = start(trainer(tmp_path, tiny_dataset, "--nproc", "2"), tmp_path)
    pids = rank_pids(tmp_path)
    wait_for(lambda: rows(tmp_path), "the first metrics")
    os.kill(pids[1], signal.SIGTERM)
    assert finish(proc) == 0, err(tmp_path)[-3000:]
    saved = [p.name for p in (tmp_path / "ck" / "tiny").glob("step_*")]
    assert len(saved) == 1 and saved[0] != f"step_{STEPS:08d}", saved
    stop = int(saved[0].removeprefix("step_"))
    text = err(tmp_path)
    assert f"stopped by signal; saved step {stop}" in text
    assert f"ranks in sync at step {stop}:" in text  # both ranks at that step
    first = start(
        trainer(tmp_path, tiny_dataset, "--nproc", "2", "--resume", "auto"),
        tmp_path,
        name="resume",
    )
    assert finish(first) == 0, err(tmp_path, "resume")[-3000:]
    assert f"resumed from {tmp_path / 'ck' / 'tiny'}" in err(tmp_path, "resume")
    assert losses(tmp_path) == losses(baseline["two"])


def test_killed_launcher_leaves_no_orphans(tmp_path, tiny_dataset):
    """D4: kill -9 to the --nproc launcher: the ranks (in their own sessions, so no
    signal reaches them) see their parent go, stop together and exit."""
    proc = start(trainer(tmp_path, tiny_dataset, "--nproc", "2",
                         training__max_steps=5000), tmp_path)  # fmt: skip
    pids = rank_pids(tmp_path)
    wait_for(lambda: rows(tmp_path), "the first metrics")
    proc.kill()
    proc.wait()
    wait_for(lambda: not any(map(alive, pids)), "the ranks to exit", timeout=20)
    text = err(tmp_path)
    assert "the launcher (pid" in text and "stopped by signal; saved step" in text


def test_mixed_jobs_or_configs_are_refused(tmp_path, tiny_dataset):
    """D5: two ranks of different jobs on the same ports (as when two jobs pick the
    same ports) are refused by the job check; so are ranks with different configs."""
    jobs = by_hand(tmp_path / "jobs", tiny_dataset, {0: ("a", {}), 1: ("b", {})})
    seed = {"training__seed": 7}
    conf = by_hand(tmp_path / "conf", tiny_dataset, {0: ("j", {}), 1: ("j", seed)})
    for out, procs, words in (
        (tmp_path / "jobs", jobs, "belongs to another job"),
        (tmp_path / "conf", conf, "was started with another config"),
    ):
        for r, proc in enumerate(procs):
            assert finish(proc, timeout=60) == 2, err(out, f"rank{r}")[-2000:]
            assert words in err(out, f"rank{r}")
            assert "Traceback" not in err(out, f"rank{r}")
    from src.train.launch import free_ports

    assert len(set(free_ports(4))) == 4


def test_rank_that_never_starts_times_out(tmp_path, tiny_dataset):
    """D6: rank 0 alone would wait for rank 1 forever; it exits with a clear error
    after --start-timeout."""
    t0 = time.time()
    (r0,) = by_hand(tmp_path, tiny_dataset, {0: ("j", {})}, ("--start-timeout", "3"))
    assert finish(r0, timeout=60) != 0
    assert time.time() - t0 < 20
    text = err(tmp_path, "rank0")
    assert "did not all connect within 3 s" in text and "127.0.0.1:" in text


def test_resume_with_other_world_size_is_refused(tmp_path, tiny_dataset, baseline):
    """D7: a 2-rank checkpoint on 1 process, and a 1-process one on 2 ranks."""
    for out, nproc, old, new in (
        (baseline["two"], 1, 2, 1),
        (baseline["one"], 2, 1, 2),
    ):
        copy = tmp_path / f"from{old}"
        shutil.copytree(out / "ck", copy / "ck", symlinks=True)
        proc = subprocess.run(
            trainer(copy, tiny_dataset, "--resume", "auto", "--nproc", str(nproc)),
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"world size (data-parallel ranks): checkpoint {old} -> now {new}" in (
            proc.stderr
        )
        assert "Traceback" not in proc.stderr


def test_mlx_launch_runs_the_trainer(tmp_path, tiny_dataset):
    """`mlx.launch --backend ring -n 2 --python ... -- -m src.train`: the ranks find
    their ring without --nproc; the ranks' own exit codes decide (mlx.launch exits 0
    even when a rank fails), so success is read from the run's outputs."""
    from src.train.launch import free_ports

    launcher = Path(sys.executable).with_name("mlx.launch")
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed beside this python")
    args = [str(launcher), "--backend", "ring", "-n", "2",
            "-p", str(free_ports(1)[0]), "--python", sys.executable, "--",
            *trainer(tmp_path, tiny_dataset, training__max_steps=10)[1:]]  # fmt: skip
    proc = subprocess.run(
        args, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(tmp_path)) == list(range(1, 11)), proc.stderr[-3000:]
    meta = json.loads((tmp_path / "ck" / "tiny" / "latest" / "meta.json").read_text())
    assert meta["world_size"] == 2 and "ranks in sync at step 10" in proc.stderr
