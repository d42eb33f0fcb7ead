"""Plots and reports from run logs (`src.plot`, `src.report`): on a tiny real run,
on hand-made logs (several runs, old logs without timestamps), and user mistakes."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src import plot, report
from src.config import dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def logs(train_tiny, tmp_path_factory) -> Path:
    """logs/<run> of a 30-step tiny run (eval at 15 and 30, a row every 5 steps)."""
    _, logs = train_tiny(
        tmp_path_factory.mktemp("plotrun"), logging__interval=5, eval__max_tokens=512,
        eval__sample_tokens=8, eval__interval=15, checkpoint__interval=30,
        training__max_steps=30,
    )  # fmt: skip
    return logs


def rows(log_dir: Path, event: str) -> list[dict]:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, (path, len(data))


def log_folder(root: Path, name: str, accum: int = 2) -> Path:
    """logs/<name>/ with the tiny config (checkpoints under root/ck: a best.json
    elsewhere must not count)."""
    d = root / name
    d.mkdir(parents=True)
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [f"training.grad_accum_steps={accum}", f"checkpoint.dir={root / 'ck'}",
         f"run_name={name}"],
    )  # fmt: skip
    (d / "config.yaml").write_text(dump_config(cfg))
    return d


def fake_run(root: Path, name: str, timed: bool = True, accum: int = 2) -> Path:
    """A hand-made log folder: 20 steps, eval at 10 and 20, a sample."""
    d = log_folder(root, name, accum)
    out = []
    for s in range(1, 21):
        row = {"event": "train", "step": s, "loss": 6.0 - 0.1 * s, "lr": 1e-3,
               "grad_norm": 1.0, "skipped": s == 7}  # fmt: skip
        if s % 5 == 0:
            row.update(tokens_per_s=1000.0, peak_memory=2**20 * s)
            if timed:
                row["time"] = 1e9 + s * 1.024  # 8*2*64 tokens/step at 1000/s
        out.append(row)
        if s % 10 == 0:
            ev = {"event": "eval", "step": s, "val_loss": 5.0 - 0.1 * s,
                  "val_ppl": 1.0, "val_bpb": 2.0 - 0.01 * s, "val_tokens": 512}  # fmt: skip
            if timed:
                ev["time"] = 1e9 + s * 1.024 + 0.5
            out.append(ev)
    out.append({"event": "sample", "step": 20, "prompt": "Once", "text": " upon"})
    lines = [json.dumps(r) for r in out]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n{torn")  # a torn last line
    return d


def test_rows_carry_wall_time(logs):
    train = [r for r in rows(logs, "train") if "tokens_per_s" in r]
    evals = rows(logs, "eval")
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    times = [r["time"] for r in train]
    assert all("time" in r for r in evals) and times == sorted(times)


def test_training_ends_with_the_report(logs):
    """The trainer writes training.png and report.md when the run ends."""
    assert_png(logs / "training.png")
    assert "## Validation" in (logs / "report.md").read_text()
    assert f"report: {logs / 'report.md'}" in (logs / "train.log").read_text()


def test_a_failing_report_is_an_error_a_broken_plot_a_warning(tmp_path, monkeypatch):
    class Log:
        def __init__(self):
            self.lines = []

        def info(self, msg):
            self.lines.append(msg)

        def warn(self, msg):
            self.lines.append(f"warning: {msg}")

        def error(self, msg):
            self.lines.append(f"error: {msg}")

    log = Log()
    failure = report.after_training(tmp_path / "missing", log)
    assert failure and failure.startswith("no report for")
    assert log.lines == [f"error: {failure}"]

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in plotting")

    monkeypatch.setattr(report, "write_report", broken)
    log = Log()
    assert report.after_training(tmp_path, log) is None
    assert log.lines == [
        f"warning: no report for {tmp_path}: ZeroDivisionError: a bug in plotting"
    ]


def test_plot_and_report_on_tiny_run(logs, capsys):
    assert plot.main([str(logs)]) == 0
    assert capsys.readouterr().out.strip() == str(logs / "training.png")
    assert_png(logs / "training.png")

    assert report.main([str(logs)]) == 0
    text = (logs / "report.md").read_text()
    evals, samples = rows(logs, "eval"), rows(logs, "sample")
    final, best = evals[-1], min(evals, key=lambda r: r["val_loss"])
    params = re.search(r"model: ([\d,]+) parameters", (logs / "train.log").read_text())
    assert params and f"| parameters | {params.group(1)} |" in text
    assert "| tokens seen | 15,360 (8 x 1 x 64 per step) |" in text  # 30 * 8 * 64
    assert f"loss {final['val_loss']:.4f}, {final['val_bpb']:.4f} bits/byte" in text
    assert f"(step {best['step']})" in text and "best validation" in text
    peak = max(r["peak_memory"] for r in rows(logs, "train") if "peak_memory" in r)
    assert f"{peak / 2**20:.1f} MiB" in text
    assert re.search(r"\| wall time \| [\d.]+ s \|", text)
    assert re.search(r"\| throughput \| [\d,]+ tokens/s", text)
    assert "![training curves](training.png)" in text
    assert samples[-1]["prompt"] + samples[-1]["text"] in text
    assert "d_model 64, 2 layers" in text


def test_several_runs_one_figure(tmp_path, logs, capsys):
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b", timed=False)
    assert plot.main([str(logs), str(a), str(b)]) == 0
    assert_png(logs / "compare.png")
    out = tmp_path / "sub" / "cmp.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    assert_png(out)
    assert capsys.readouterr().out.split() == [str(logs / "compare.png"), str(out)]


def test_tokens_and_seconds_of_a_hand_made_log(tmp_path):
    run = plot.load_run(fake_run(tmp_path, "r"))
    assert len(run.train) == 20 and len(run.evals) == 2 and len(run.samples) == 1
    assert run.tokens_per_step == 8 * 2 * 64
    assert run.tokens(run.evals).tolist() == [10 * 1024, 20 * 1024]
    # the first logging row (step 5, 1000 tokens/s) puts step 0 at 1e9 exactly
    assert abs(run.start_time() - 1e9) < 1e-6
    secs = run.seconds(run.train)
    assert np.allclose(secs, np.arange(1, 21) * 1.024, atol=1e-4), secs
    s = report.summary(run)
    assert s["tokens"] == 20 * 1024 and s["skipped"] == 1
    assert s["best"]["step"] == 20 and s["peak_memory"] == 20 * 2**20
    assert abs(s["seconds"] - (20 * 1.024 + 0.5)) < 1e-4


def test_report_on_an_old_log_without_timestamps(tmp_path, capsys):
    d = fake_run(tmp_path, "old", timed=False)
    assert plot.load_run(d).seconds(plot.load_run(d).train) is None
    assert report.main([str(d)]) == 0
    text = (d / "report.md").read_text()
    assert "unknown (no timestamps in the log)" in text
    assert "| skipped steps | 1 |" in text and "Step 20:" in text
    assert_png(d / "training.png")
    assert report.main([str(d), "--no-plot"]) == 0
    assert "![training" not in (d / "report.md").read_text()


def test_smooth_is_a_trailing_mean():
    y = np.arange(100, dtype=float)
    s = plot.smooth(y)  # window 2
    assert s[0] == 0 and np.allclose(s[1:], y[1:] - 0.5)
    assert plot.smooth(np.array([3.0])).tolist() == [3.0]


@pytest.mark.parametrize("module", [plot, report])
def test_user_mistakes_exit_2(tmp_path, capsys, module):
    (tmp_path / "empty").mkdir()
    no_rows = fake_run(tmp_path, "norows")
    (no_rows / "metrics.jsonl").write_text("")
    cases = [
        ([str(tmp_path / "missing")], "no such log folder"),
        ([str(tmp_path / "empty")], "no metrics.jsonl"),
        ([str(no_rows)], "no training steps"),
    ]
    if module is plot:
        run = fake_run(tmp_path, "ok")
        cases.append(([str(run), "--out", str(tmp_path / "x.nope")], "nope"))
    for argv, message in cases:
        assert module.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
        assert "Traceback" not in err


def test_plot_cli_subprocess(tmp_path):
    d = fake_run(tmp_path, "r")
    proc = subprocess.run(
        [sys.executable, "-m", "src.plot", str(d)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert_png(d / "training.png")
    # no MLX on this path: tests/test_imports.py


# ------------------------------------------- a resume, the best, compiling steps

PAUSE = 100.0  # seconds between the two sessions of `resumed_run`


def resumed_run(root: Path, name: str = "r", markers: bool = True) -> Path:
    """A log of two sessions, as the trainer writes it: steps 1-10, then (resumed
    from the checkpoint at 10, PAUSE seconds later) steps 11-25; a logging row at
    each session's first step (compiling: a low tokens/s) and every 5 steps at
    1000 tokens/s; validation at 5, 10, 20 (the lowest) and 25; a skipped step."""
    d = log_folder(root, name)
    rows, clock = [], 1e9
    for start, end in ((0, 10), (10, 25)):
        clock += 0 if start == 0 else PAUSE
        for s in range(start + 1, end + 1):
            row = {"event": "train", "step": s, "loss": 6.0 - 0.1 * s, "lr": 1e-3 * s,
                   "grad_norm": 1.0, "skipped": s == 7}  # fmt: skip
            if s == start + 1 and markers:
                row["start"] = start
            if s == start + 1 or s % 5 == 0:
                clock += 1.024 * (s - start if s == start + 1 else 5)
                row.update(tokens_per_s=50.0 if s == start + 1 else 1000.0,
                           peak_memory=2**20, time=clock)  # fmt: skip
            rows.append(row)
            if s in (5, 10, 20, 25):
                val = {5: 5.5, 10: 5.0, 20: 4.5, 25: 4.7}[s]
                rows.append({"event": "eval", "step": s, "val_loss": val,
                             "val_ppl": 1.0, "val_bpb": 2.0, "time": clock + 0.1})  # fmt: skip
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def lines(ax) -> dict:
    return {ln.get_label(): ln for ln in ax.get_lines()}


def test_plot_data_of_a_resumed_run(tmp_path):
    """Steps on the x axes, a break (NaN) and a dotted line at the resume, the
    best validation starred, compiling steps out of throughput."""
    run = plot.load_run(resumed_run(tmp_path))
    assert run.starts() == [0, 10] and run.resumes() == [10]
    fig = plot.build_figure([run])
    ax_loss, ax_time, ax_lr, ax_tps = fig.axes
    assert [ax.get_title() for ax in fig.axes] == list(plot.TITLES)
    assert [ax.get_xlabel() for ax in (ax_loss, ax_lr, ax_tps)] == ["step"] * 3
    nan = np.nan
    steps = [s for s in range(1, 26) if s != 7]  # the skipped step is not drawn
    gap = [*steps[:9], nan, *steps[9:]]
    found = lines(ax_loss)
    np.testing.assert_array_equal(found["r train"].get_xdata(), gap)
    np.testing.assert_array_equal(found["_raw"].get_xdata(), gap)
    assert np.isnan(found["r train"].get_ydata()[9])
    np.testing.assert_array_equal(found["r val"].get_xdata(), [5, 10, nan, 20, 25])
    best = found["r best: step 20, val 4.5000"]
    assert list(best.get_xdata()) == [20] and list(best.get_ydata()) == [4.5]
    assert list(found["r resumed"].get_xdata()) == [10, 10]
    np.testing.assert_array_equal(lines(ax_lr)["r"].get_xdata(), gap)
    tps = lines(ax_tps)["r"]
    np.testing.assert_array_equal(tps.get_xdata(), [5, 10, nan, 15, 20, 25])
    np.testing.assert_array_equal(tps.get_ydata(), [1000] * 2 + [nan] + [1000] * 3)
    assert ax_time.get_xlabel() == "wall time (min)"  # > 2 minutes with the pause
    mins = lines(ax_time)["r train"].get_xdata()
    cut = int(np.flatnonzero(np.isnan(mins))[0])
    assert cut == 9 and mins[cut + 1] - mins[cut - 1] > PAUSE / 60, mins
    assert all(ax.child_axes[0].get_xlabel() == "tokens" for ax in (ax_loss, ax_lr))


def test_best_is_the_best_checkpoint_when_its_folder_says(tmp_path):
    d = resumed_run(tmp_path)
    run = plot.load_run(d)
    assert run.best()["step"] == 20  # no checkpoint folder: the lowest val_loss
    best = tmp_path / "ck" / "r" / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"step": 25, "metric": 4.7}))
    assert run.best()["step"] == 25  # e.g. step 20 was validated, not saved
    marker = [k for k in lines(plot.build_figure([run]).axes[0]) if "best" in k]
    assert marker == ["r best: step 25, val 4.7000"]
    best.write_text(json.dumps({"step": 30, "metric": 4.0}))  # not in this log
    assert run.best()["step"] == 20


def test_older_logs_resume_where_the_steps_jump(tmp_path):
    """Logs without "start" markers: a session starts where a step does not follow
    the previous one (and at the first row)."""
    d = resumed_run(tmp_path, markers=False)
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not (r["event"] == "train" and 11 <= r["step"] <= 14)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot.load_run(d).starts() == [0, 14]
    assert plot.load_run(resumed_run(tmp_path, "c", markers=False)).starts() == [0]


def test_report_of_a_resumed_run(tmp_path):
    d = resumed_run(tmp_path)
    s = report.summary(plot.load_run(d))
    assert s["resumed"] == [10] and s["tokens_per_s"] == 1000.0  # compiling left out
    assert s["best"]["step"] == 20 and s["skipped"] == 1
    assert report.main([str(d)]) == 0
    text = (d / "report.md").read_text()
    assert "| resumed at | step 10 |" in text
    assert "| throughput | 1,000 tokens/s" in text
    assert_png(d / "training.png")


def test_runs_with_other_tokens_per_step_say_so(tmp_path):
    a, b = fake_run(tmp_path, "a", accum=1), fake_run(tmp_path, "b", accum=2)
    fig = plot.build_figure([plot.load_run(a), plot.load_run(b)])
    assert {"a (512 tok/step) train", "b (1,024 tok/step) train"} <= set(
        lines(fig.axes[0])
    )
    assert not fig.axes[0].child_axes  # no one token scale for both
