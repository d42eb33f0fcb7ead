"""Experiment trackers (`logging.report_to`: tensorboard, wandb; src/train/reporters.py):
a real tiny run, stopped by Ctrl-C and resumed, read back from TensorBoard's event
files and W&B's offline run files and compared with metrics.jsonl; a tracker that
fails is one warning and is switched off; every way out of the loop closes them;
a misspelt name or a package not installed is one `error:` line, exit 2."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from src import plot
from src.config import ConfigError, load_config
from src.train import reporters
from src.train.logbook import RunLog
from src.train.reporters import Reporters, TensorBoard
from src.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RUN = "tiny"


# ------------------------------------------------------------- read-back helpers


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files in `folder`, read by TensorBoard's
    own EventAccumulator (each (tag, step) must appear once)."""
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["tensors"]:
        events = acc.Tensors(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), (tag, steps)
        out[tag] = {e.step: float(make_ndarray(e.tensor_proto)) for e in events}
    return out


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (run-<id>.wandb): W&B's protobuf `Record`s
    in LevelDB's log format (32 KiB blocks, 7-byte record headers: crc32,
    length, type 1 full / 2 first / 3 middle / 4 last), after a 7-byte
    ":W&B" header. W&B has no reader for offline files of its own."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    records, pos, part = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        part += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def wandb_history(records: list) -> dict[int, dict]:
    """{step: {key: value}} of the history records."""
    out: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item}  # fmt: skip
            out.setdefault(items["_step"], {}).update(items)
    return out


def metrics(log_dir: Path, event: str) -> list[dict]:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


# ----------------------------------------------------------------- a real run


def train_cmd(out: Path, dataset: dict, *extra: str, **sets) -> list[str]:
    base = {
        "data.train_path": dataset["train"], "data.val_path": dataset["val"],
        "data.tokenizer_path": dataset["tokenizer"], "checkpoint.dir": out / "ck",
        "logging.dir": out / "logs", "logging.progress_bar": "false",
        "logging.interval": 5, "eval.interval": 10, "eval.max_tokens": 512,
        "eval.sample_tokens": 8, "checkpoint.interval": 10,
        "logging.report_to": "[tensorboard,wandb]",
    }  # fmt: skip
    base.update({k.replace("__", "."): v for k, v in sets.items()})
    args = [a for k, v in base.items() for a in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "src.train", "--config", "configs/tiny.yaml",
            *args, *extra]  # fmt: skip


def offline_env() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def resumed(tiny_dataset, tmp_path_factory) -> dict:
    """A tiny run with both trackers, stopped by Ctrl-C (SIGINT to its process
    group, W&B's service process included) after its first logged rows, then
    resumed with --resume auto to 12 steps past the stop."""
    out = tmp_path_factory.mktemp("monitor")
    logs = out / "logs" / RUN
    proc = subprocess.Popen(
        train_cmd(out, tiny_dataset, training__max_steps=2000),
        cwd=ROOT, env=offline_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ((logs / "metrics.jsonl").exists() and metrics(logs, "train")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no step logged in 120 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C
        _, first_err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, first_err[-3000:]
    stopped = metrics(logs, "train")[-1]["step"]
    second = subprocess.run(
        train_cmd(out, tiny_dataset, "--resume", "auto",
                  training__max_steps=stopped + 12),
        cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    return {"logs": logs, "stopped": stopped, "end": stopped + 12,
            "stderr": [first_err, second.stderr]}  # fmt: skip


def test_tensorboard_holds_the_metrics_rows(resumed):
    """The event files, read back by TensorBoard, hold exactly the rows of
    metrics.jsonl (each step once, across the resume)."""
    logs = resumed["logs"]
    assert f"reporting to tensorboard: {logs / 'tensorboard'}" in resumed["stderr"][1]
    tb = tensorboard_scalars(logs / "tensorboard")
    train, evals = metrics(logs, "train"), metrics(logs, "eval")
    assert [r["step"] for r in train] == list(range(1, resumed["end"] + 1))
    for key in ("loss", "lr", "grad_norm"):
        want = {r["step"]: np.float32(r[key]) for r in train}
        assert tb[f"train/{key}"] == want, key
    rates = {r["step"]: np.float32(r["tokens_per_s"]) for r in train
             if "tokens_per_s" in r and "start" not in r}  # fmt: skip
    assert rates and tb["train/tokens_per_s"] == rates
    assert {r["step"] for r in evals} >= {10, resumed["end"]}
    for key in ("loss", "ppl", "bpb"):
        want = {r["step"]: np.float32(r[f"val_{key}"]) for r in evals}
        assert tb[f"val/{key}"] == want, key


def test_wandb_offline_runs_hold_each_session(resumed):
    """One offline W&B run per session, each closed (an exit record, code 0:
    the Ctrl-C stop-save and the normal end), holding its session's rows."""
    logs, stopped = resumed["logs"], resumed["stopped"]
    files = sorted((logs / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    train = {r["step"]: r for r in metrics(logs, "train")}
    evals = {r["step"]: r for r in metrics(logs, "eval")}
    for path, steps in zip(files, [range(1, stopped + 1),
                                   range(stopped + 1, resumed["end"] + 1)]):  # fmt: skip
        records = wandb_records(path)
        exits = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
        assert [e.exit_code for e in exits] == [0], path
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.display_name == RUN and run.project == "mlx-slm"
        history = wandb_history(records)
        assert set(history) == set(steps), (path, sorted(history))
        for s in steps:
            assert history[s]["train/loss"] == train[s]["loss"]
            assert history[s]["train/lr"] == train[s]["lr"]
            if s in evals:
                assert history[s]["val/loss"] == evals[s]["val_loss"]
                assert history[s]["samples/_type"] == "table-file"


def test_plot_of_the_resumed_run_marks_the_resume(resumed):
    """The trainer marks each session's first row; the plot of the real logs
    breaks at the stop and leaves both compiling steps out of throughput."""
    logs, stopped = resumed["logs"], resumed["stopped"]
    starts = [(r["step"], r["start"]) for r in metrics(logs, "train") if "start" in r]
    assert starts == [(1, 0), (stopped + 1, stopped)]
    run = plot.load_run(logs)
    assert run.resumes() == [stopped]
    fig = plot.build_figure([run])
    x = line(fig.axes[0], f"{RUN} train").get_xdata()
    gap = int(np.flatnonzero(np.isnan(x))[0])
    assert x[gap - 1] == stopped and x[gap + 1] == stopped + 1
    tps = line(fig.axes[3], RUN).get_xdata()
    assert 1 not in tps and stopped + 1 not in tps


def line(ax, label: str):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found


# ------------------------------------------------------------------ failures


class Fake:
    """A tracker that records what it gets; `fail_at`: the write that raises."""

    name = "fake"

    def __init__(self, fail_at: int | None = None, fail_close: bool = False):
        self.rows, self.writes, self.closed = [], 0, []
        self.fail_at, self.fail_close = fail_at, fail_close

    def begin(self, rows):
        self.rows += rows

    def write(self, rows):
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(28, "No space left on device")
        self.rows += rows

    def close(self, exit_code):
        self.closed.append(exit_code)
        if self.fail_close:
            raise RuntimeError("cannot close")


def test_a_failing_reporter_warns_once_and_is_switched_off(tmp_path):
    log = RunLog(tmp_path, progress_bar=False)
    flaky, good = Fake(fail_at=2), Fake()
    log.reporters = Reporters([flaky, good], log.warn)
    log.begin(0)
    for step in (10, 20, 30):
        log.eval_row(step, {"val_loss": 5.0, "val_ppl": 1.0, "val_bpb": 2.0})
    assert [r["step"] for r in good.rows] == [10, 20, 30]
    assert [r["step"] for r in flaky.rows] == [10] and flaky.writes == 2
    assert flaky.closed == [1]  # closed when switched off, never again
    warnings = [x for x in (tmp_path / "train.log").read_text().splitlines()
                if "warning:" in x]  # fmt: skip
    assert len(warnings) == 1, warnings
    assert "fake: OSError while writing" in warnings[0]
    assert (
        "No space left on device" in warnings[0] and "no more reporting" in warnings[0]
    )
    assert [r["step"] for r in metrics(tmp_path, "eval")] == [10, 20, 30]
    log.close(0)
    assert good.closed == [0] and flaky.closed == [1]


def test_close_survives_a_reporter_that_fails_to_close():
    said = []
    a, b = Fake(fail_close=True), Fake()
    group = Reporters([a, b], said.append)
    group.close(130)
    assert a.closed == [130] and b.closed == [130]
    assert said == ["fake: RuntimeError while closing: cannot close"]
    group.close(0)  # a second close does nothing
    assert a.closed == [130]


@pytest.mark.parametrize(
    "outcome, code",
    [(0, 0), (2, 2), (RuntimeError("a bug"), 1), (KeyboardInterrupt(), 1)],
)
def test_trainer_closes_the_reporters_on_every_way_out(monkeypatch, outcome, code):
    """Finished or stopped (0), a failed log write (2), an error, a second Ctrl-C:
    the reporters are closed once with the run's exit code, and an exception
    still propagates."""

    class Log:
        closed: list = []

        def report_to(self, cfg):
            self.opened = cfg

        def close(self, exit_code):
            self.closed.append(exit_code)

    def train(self):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(Trainer, "train", train)
    trainer = object.__new__(Trainer)  # the hook only: no model needed
    trainer.cfg, trainer.log = object(), Log()
    if isinstance(outcome, BaseException):
        with pytest.raises(type(outcome)):
            trainer.run()
    else:
        assert trainer.run() == outcome
    assert trainer.log.opened is trainer.cfg and trainer.log.closed == [code]


def test_tensorboard_session_replaces_the_steps_metrics_dropped(tmp_path):
    """A session killed at step 20 after a checkpoint at 10: the resumed session
    starts from metrics.jsonl's rows 1-10, so TensorBoard sees 11-20 once, with
    the new values."""

    def rows(steps, base):
        return [{"event": "train", "step": s, "loss": base + s, "lr": 1e-3,
                 "grad_norm": 1.0} for s in steps]  # fmt: skip

    first = TensorBoard(tmp_path)
    first.begin([])
    first.write(rows(range(1, 21), 10.0))
    first.close(0)
    again = TensorBoard(tmp_path)
    again.begin(rows(range(1, 11), 10.0))
    again.write(rows(range(11, 31), 100.0))
    again.close(0)
    loss = tensorboard_scalars(tmp_path / "tensorboard")["train/loss"]
    assert loss == {s: (10.0 if s <= 10 else 100.0) + s for s in range(1, 31)}
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_scalars_of_a_row():
    row = {"event": "train", "step": 11, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5,
           "skipped": False, "tokens_per_s": 100.0, "peak_memory": 2**20, "time": 1.0}  # fmt: skip
    assert reporters.scalars(row) == {
        "train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": 0.5,
        "train/tokens_per_s": 100.0, "train/peak_memory": 2.0**20,
    }  # fmt: skip
    assert "train/tokens_per_s" not in reporters.scalars({**row, "start": 10})
    ev = {"event": "eval", "step": 20, "val_loss": 3.0, "val_ppl": 20.1,
          "val_bpb": 1.5, "val_tokens": 512, "time": 2.0}  # fmt: skip
    assert reporters.scalars(ev) == {"val/loss": 3.0, "val/ppl": 20.1,
                                     "val/bpb": 1.5, "val/tokens": 512.0}  # fmt: skip
    assert reporters.scalars({"event": "sample", "step": 20, "text": "x"}) == {}


# ------------------------------------------------------------- user mistakes


def test_report_to_config_rules():
    tiny = ROOT / "configs/tiny.yaml"
    assert load_config(tiny).logging.report_to == []
    assert load_config(tiny, ["logging.report_to=wandb"]).logging.report_to == ["wandb"]
    both = load_config(tiny, ["logging.report_to=[tensorboard, wandb]"])
    assert both.logging.report_to == ["tensorboard", "wandb"]
    with pytest.raises(
        ConfigError, match=r"report_to=\['wandb', 'wandb'\]: 'wandb' is listed twice"
    ):
        load_config(tiny, ["logging.report_to=[wandb,wandb]"])


def test_unknown_reporter_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", "--config", "configs/tiny.yaml",
         "--set", "logging.report_to=[tensorbord,wandb]"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: configs/tiny.yaml: logging.report_to=['tensorbord', 'wandb']: "
        "'tensorbord' is not one of tensorboard, wandb"
    ]


def test_a_package_not_installed_is_one_error_line(tmp_path, tiny_dataset):
    """wandb shadowed by a package that is "not there": exit 2, one `error:` line
    saying how to install it, no traceback, nothing trained or saved. (A broken
    install is said as such: the next test.)"""
    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(  # what Python raises for an absent module
        "raise ModuleNotFoundError(\"No module named 'wandb'\", name='wandb')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run(
        train_cmd(tmp_path, tiny_dataset, training__max_steps=5,
                  logging__report_to="wandb"),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert errors == [
        "error: logging.report_to=['wandb']: wandb is not installed; install the "
        "monitor extra: pip install -e '.[monitor]'"
    ], proc.stderr
    assert "Traceback" not in proc.stderr
    # refused before the run's folders are made
    assert (
        not (tmp_path / "ck" / RUN).exists() and not (tmp_path / "logs" / RUN).exists()
    )


def test_a_broken_package_is_said_as_such(tmp_path, monkeypatch):
    fake = tmp_path / "wandb"
    fake.mkdir()
    (fake / "__init__.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    with pytest.raises(ConfigError) as exc:
        reporters.require(["wandb"])
    assert str(exc.value) == (
        "logging.report_to=['wandb']: wandb cannot be imported (No module named "
        "'no_such_dependency_xyz'); install the monitor extra: pip install -e "
        "'.[monitor]'"
    )
