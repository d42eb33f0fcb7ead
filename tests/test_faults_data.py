"""Issue 15, the data pipeline: faults a hostile user found beyond FAULTS.md, each
driven through the real commands (`python -m src.data`, `python -m src.train`).

Item 5: a token file replaced, deleted or truncated while a run reads it.
Item 7: `prepare` interrupted (SIGTERM, Ctrl-C, SIGKILL) or failing over an
existing dataset. Item 15: record rows without text, counted by reason. Item 20:
the tokenizer hash in the token file's own header. Plus hostile values at the
door of `python -m src.data`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from src.checkpoint.store import list_checkpoints, verify_checkpoint
from src.data import cli as D
from src.data import tokens as T
from src.data.loader import TokenLoader
from src.errors import DataError
from src.tokenizer.spm import Tokenizer
from src.tokenizer.training import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform == "linux"  # /proc: the worker processes of a command


def data_cli(*argv, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "src.data",
         *(a if isinstance(a, bytes) else str(a) for a in argv)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def one_error_line(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """The command failed as a user mistake: exit 2, one `error:` line naming
    `parts`, no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), proc.stderr
    for part in parts:
        assert part in line, (part, line)
    return line


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pids: set[int]) -> set[int]:
    """The pids still running (a zombie has ended: only its parent has not
    reaped it yet)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


# ------------------------------------------------------------------- item 5


def _train(dataset: dict, data: Path, out: Path, max_steps: int) -> subprocess.Popen:
    sets = {
        "data.train_path": data / "train.bin",
        "data.val_path": data / "val.bin",
        "data.tokenizer_path": dataset["tokenizer"],
        "checkpoint.dir": out / "ck",
        "logging.dir": out / "logs",
        "logging.progress_bar": "false",
        "logging.interval": 5,
        "training.max_steps": max_steps,
        "eval.interval": 0,  # the final evaluation reads val.bin at the end
        "eval.max_tokens": 512,
        "eval.sample_tokens": 0,
        "checkpoint.interval": 0,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen(
        [sys.executable, "-m", "src.train", "--config", "configs/tiny.yaml", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_steps(proc: subprocess.Popen, out: Path) -> None:
    """Until the run has logged its first steps (it is reading train.bin)."""
    metrics = out / "logs" / "tiny" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.stat().st_size):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run logged no step in 120 s"
        time.sleep(0.05)


def _copy_dataset(dataset: dict, folder: Path) -> Path:
    folder.mkdir()
    for name in ("train.bin", "val.bin"):
        shutil.copy(dataset[name.split(".")[0]], folder / name)
    shutil.copy(dataset["train"].parent / "meta.json", folder / "meta.json")
    return folder


def test_item5_token_file_replaced_while_training(tiny_dataset, tmp_path):
    """As `prepare` writes (a temp file renamed over the path): train.bin replaced
    by a much shorter file, val.bin deleted, while the run reads them. The run
    keeps reading the files it checked and finishes; no crash, no traceback."""
    data = _copy_dataset(tiny_dataset, tmp_path / "data")
    proc = _train(tiny_dataset, data, tmp_path / "run", max_steps=50)
    try:
        _wait_for_steps(proc, tmp_path / "run")
        short = np.asarray(T.open_tokens(data / "train.bin"))[:100]
        T.write_tokens(data / "train.bin", short, 512)  # temp file + rename
        (data / "val.bin").unlink()
        assert proc.poll() is None, "the run ended before the files were replaced"
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "double free" not in err, err[-3000:]
    assert (tmp_path / "run" / "ck" / "tiny" / "step_00000050").is_dir()


def test_item5_token_file_truncated_in_place_stops_cleanly(tiny_dataset, tmp_path):
    """The same inode shrinking under the run (a map past its end would be
    SIGBUS): one error line naming the file and the fix, exit 2."""
    data = _copy_dataset(tiny_dataset, tmp_path / "data")
    proc = _train(tiny_dataset, data, tmp_path / "run", max_steps=400)
    try:
        _wait_for_steps(proc, tmp_path / "run")
        os.truncate(data / "train.bin", 1000)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    for part in (str(data / "train.bin"), "changed in place", "rename"):
        assert part in line, (part, line)
    # the steps trained before the change are saved, and verify
    step = int(re.search(r"stopping at step (\d+)", line).group(1))
    assert step > 0
    run = tmp_path / "run" / "ck" / "tiny"
    assert [p.name for p in list_checkpoints(run)] == [f"step_{step:08d}"]
    verify_checkpoint(run / f"step_{step:08d}")


def test_item5_loader_reads_the_file_it_checked(tmp_path):
    path = tmp_path / "t.bin"
    ids = np.random.default_rng(0).integers(0, 1000, 5000)
    T.write_tokens(path, ids, 1000)
    loader = TokenLoader(path, 16, 1000)
    first = loader.batch(1, 7, 8)
    val = list(loader.val_batches(4, 200))
    starts = np.random.default_rng([1, 7]).integers(0, 5000 - 16, 8)
    np.testing.assert_array_equal(first, ids[starts[:, None] + np.arange(17)])
    # replaced (temp file + rename) by a shorter file, then deleted: the same data
    T.write_tokens(path, ids[:50], 1000)
    np.testing.assert_array_equal(loader.batch(1, 7, 8), first)
    path.unlink()
    np.testing.assert_array_equal(loader.batch(1, 7, 8), first)
    for a, b in zip(loader.val_batches(4, 200), val, strict=True):
        np.testing.assert_array_equal(a, b)
    loader.close()

    # changed in place: truncated, or rewritten with the same size
    for change in ("truncate", "rewrite"):
        T.write_tokens(path, ids, 1000)
        loader = TokenLoader(path, 16, 1000)
        time.sleep(0.05)  # a new mtime
        if change == "truncate":
            os.truncate(path, 100)
        else:
            with open(path, "r+b") as f:
                f.seek(T.HEADER_SIZE)
                f.write(np.full(100, 999, "<u2").tobytes())
        with pytest.raises(DataError, match="changed in place while in use") as err:
            loader.batch(1, 7, 8)
        assert str(path) in str(err.value)


# ------------------------------------------------------------------- item 7


@pytest.fixture(scope="module")
def big_corpus(story_corpus) -> Path:
    """Enough text that `prepare --workers 2` runs for a second or more."""
    return story_corpus(4_000_000)


@pytest.fixture
def old_dataset(tmp_path, tok_dir, stories) -> Path:
    """A dataset folder that a later `prepare` must leave whole unless it
    commits a new one."""
    corpus = tmp_path / "old.txt"
    corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories[:200]))
    out = tmp_path / "dataset"
    argv = ["prepare", "--input", corpus, "--tokenizer", tok_dir, "--output", out]
    assert D.main([str(a) for a in argv]) == 0
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    return out


def _start_prepare(corpus: Path, tok_dir: Path, out: Path) -> subprocess.Popen:
    """`prepare --workers 2` into `out`, in a session of its own (so a signal can
    go to its whole process group, as Ctrl-C in a terminal does); returns once
    it is mid-way, writing its new train.bin."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "src.data", "prepare", "--input", str(corpus),
         "--tokenizer", str(tok_dir), "--output", str(out), "--workers", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not any(
        p.name.startswith(".train.bin.") and p.stat().st_size > 1 << 16
        for p in out.iterdir()
    ):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "prepare wrote nothing in 120 s"
        time.sleep(0.01)
    return proc


def _reap(workers: set[int], within: float) -> set[int]:
    """The workers still running after up to `within` seconds (killed then, so a
    failing test leaves none behind)."""
    deadline = time.monotonic() + within
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(workers)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.skipif(not LINUX, reason="finds the workers in /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_item7_prepare_interrupted_keeps_old_dataset(
    big_corpus, tok_dir, old_dataset, sig
):
    """SIGTERM to the command, or Ctrl-C (SIGINT to its process group, workers
    too) mid-way: the old dataset byte for byte, no temp file, no worker left,
    exit 128 + signal with one line."""
    before = snapshot(old_dataset)
    proc = _start_prepare(big_corpus, tok_dir, old_dataset)
    workers = children(proc.pid)
    try:
        assert len(workers) >= 2, workers
        signum = getattr(signal, sig)
        if sig == "SIGINT":
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        left = _reap(workers, within=1.0)
    assert not left, "workers outlived the command"
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == f"interrupted by {sig}; {old_dataset} is as it was", last
    assert snapshot(old_dataset) == before, "the old dataset changed"


@pytest.mark.skipif(not LINUX, reason="finds the workers in /proc")
def test_item7_workers_exit_when_prepare_is_killed(big_corpus, tok_dir, old_dataset):
    """A parent killed outright (SIGKILL) cannot stop its workers: they must
    notice and exit, not wait for tasks forever."""
    before = snapshot(old_dataset)
    proc = _start_prepare(big_corpus, tok_dir, old_dataset)
    workers = children(proc.pid)
    proc.kill()
    proc.communicate(timeout=60)
    assert len(workers) >= 2, workers
    assert not _reap(workers, within=5.0), "orphaned workers still run"
    # the old files are whole; only the killed command's temp files are extra
    after = snapshot(old_dataset)
    assert {k: after[k] for k in before} == before


def test_item7_failed_prepare_keeps_old_dataset(old_dataset, tok_dir, tmp_path):
    """A prepare that fails after it began writing (here: every document is
    filtered out) over an existing dataset leaves it whole, meta.json included
    (it used to be deleted first), and no temp file."""
    before = snapshot(old_dataset)
    corpus = tmp_path / "short.txt"
    corpus.write_text("".join(f"story {i}\n<|endoftext|>\n" for i in range(300)))
    proc = data_cli("prepare", "--input", corpus, "--tokenizer", tok_dir,
                    "--output", old_dataset, "--min-words", 3)  # fmt: skip
    one_error_line(proc, "split is empty", "'too_short': 300")
    assert snapshot(old_dataset) == before


# ------------------------------------------------------------------ item 15


def _rows_file(path: Path, stories: list[str]) -> tuple[Path, int]:
    """A jsonl of `stories`' rows mixed with rows without text: a key missing
    from some rows, nulls, numbers, lists and empty strings. Returns it and how
    many rows carry text."""
    rows = [{"text": s} for s in stories]
    rows += [{"id": i} for i in range(4)]  # no "text" key: read as null
    rows += [{"text": None}] * 3 + [{"text": 7}, {"text": 2.5}, {"text": ["a"]}]
    rows += [{"text": ""}, {"text": "   "}]
    order = np.random.default_rng(0).permutation(len(rows))
    path.write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    return path, len(stories)


def test_item15_rows_without_text_are_counted(tmp_path, tok_dir, stories):
    rows, usable = _rows_file(tmp_path / "rows.jsonl", stories[:60])
    out = tmp_path / "o"
    proc = data_cli("prepare", "--input", rows, "--tokenizer", tok_dir,
                    "--output", out, "--min-words", 0, "--max-repetition", 1)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped_rows"] == {"no_field": 0, "null": 7, "not_text": 3}
    assert meta["dropped"]["empty"] == 2  # blank text is an empty document
    assert sum(s["docs"] for s in meta["splits"].values()) == usable
    assert "rows skipped (no text in field 'text'): 7 null, 3 not_text" in proc.stdout


def test_item15_hub_rows_without_text_are_counted(
    tmp_path, tok_dir, stories, monkeypatch, capsys
):
    """The hub path reads rows with the same code: pointed at the same local
    rows (the hub's streaming reader), prepare and download count them too."""
    import datasets

    rows, usable = _rows_file(tmp_path / "rows.jsonl", stories[:60])
    real = datasets.load_dataset
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: real(
            "json", data_files=[str(rows)], split="train", streaming=True
        ),
    )
    argv = ["prepare", "--hf-dataset", "org/x", "--tokenizer", str(tok_dir),
            "--output", str(tmp_path / "o"), "--min-words", "0"]  # fmt: skip
    assert D.main(argv) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["skipped_rows"] == {"no_field": 0, "null": 7, "not_text": 3}
    assert "7 null, 3 not_text" in capsys.readouterr().out
    txt = tmp_path / "dl.txt"
    assert D.main(["download", "--output", str(txt), "--dataset", "org/x"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {usable} documents" in out
    assert "7 null, 3 not_text, 2 empty" in out


@pytest.mark.parametrize(
    "rows, says",
    [
        ([{"id": 1, "body": "a b c"}] * 3, "row 0 has no field 'text' (fields: body, id)"),
        ([{"text": None, "body": "a"}] * 3, "row 0 field 'text' is null"),
        ([{"text": [{"role": "user"}]}] * 2, "is a list, not text (a conversation?"),
    ],
)  # fmt: skip
def test_item15_no_row_has_text_names_file_and_fields(tmp_path, tok_dir, rows, says):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = data_cli("prepare", "--input", path, "--tokenizer", tok_dir,
                    "--output", tmp_path / "o")  # fmt: skip
    one_error_line(proc, str(path), "no row has text in field 'text'", says)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ item 20


@pytest.fixture(scope="module")
def other_tokenizer(tiny_dataset, tmp_path_factory) -> Path:
    """A tokenizer of the same vocabulary size as tiny_dataset's, trained on
    other text: another sha256."""
    text = (ROOT / "README.md").read_text(encoding="utf-8") * 3
    corpus = tmp_path_factory.mktemp("other") / "c.txt"
    corpus.write_text(text, encoding="utf-8")
    out = tmp_path_factory.mktemp("other-tok")
    train_tokenizer([corpus], out, vocab_size=512)
    assert (
        Tokenizer.load(out).sha256 != Tokenizer.load(tiny_dataset["tokenizer"]).sha256
    )
    return out


def test_item20_token_file_of_another_tokenizer_is_refused(
    tiny_dataset, other_tokenizer, story_corpus, tmp_path
):
    """Token files made with another tokenizer of the same vocabulary size,
    copied without their meta.json: the header names the tokenizer, and the
    trainer refuses them, naming both hashes and the fix."""
    made = tmp_path / "made"
    proc = data_cli("prepare", "--input", story_corpus(250_000), "--tokenizer",
                    other_tokenizer, "--output", made)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = Tokenizer.load(other_tokenizer).sha256
    ours = Tokenizer.load(tiny_dataset["tokenizer"]).sha256
    assert T.read_header(made / "train.bin").tokenizer_sha256 == theirs
    copied = tmp_path / "copied"
    copied.mkdir()
    for name in ("train.bin", "val.bin"):
        shutil.copy(made / name, copied / name)  # without meta.json
    proc = _train(tiny_dataset, copied, tmp_path / "run", max_steps=2)
    out, err = proc.communicate(timeout=300)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    one_error_line(proc, str(copied / "train.bin"), theirs, ours, "prepare")


def test_item20_version_1_and_2_files_are_read(tiny_dataset, tmp_path):
    """Files of both versions go through every reader: stats, split (which
    carries the tokenizer over), the loader; a header and a meta.json that name
    different tokenizers are refused."""
    sha = Tokenizer.load(tiny_dataset["tokenizer"]).sha256
    v2 = tiny_dataset["train"]
    v1 = tmp_path / "v1.bin"
    T.write_tokens(v1, np.asarray(T.open_tokens(v2)), 512)  # no tokenizer: v1
    assert v1.stat().st_size == v2.stat().st_size - 32
    proc = data_cli("stats", v1, v2)
    assert proc.returncode == 0, proc.stderr
    one, two = map(json.loads, proc.stdout.splitlines())
    assert (one["version"], one["tokenizer_sha256"]) == (1, None)
    assert (two["version"], two["tokenizer_sha256"]) == (2, sha)
    assert one["docs"] == two["docs"] and one["max_id"] == two["max_id"]
    for path in (v1, v2):
        loader = TokenLoader(path, 64, 512, sha)
        np.testing.assert_array_equal(
            loader.batch(0, 3, 4), TokenLoader(v2, 64, 512).batch(0, 3, 4)
        )
    proc = data_cli("split", "--input", v2, "--output", tmp_path / "s",
                    "--val-tokens", 2000)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for split in ("train", "val"):
        assert T.read_header(tmp_path / "s" / f"{split}.bin").tokenizer_sha256 == sha
        TokenLoader(tmp_path / "s" / f"{split}.bin", 64, 512, sha)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["tokenizer"]["sha256"] = "f" * 64
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="header names tokenizer sha256"):
        TokenLoader(tmp_path / "s" / "train.bin", 64, 512)


# -------------------------------------------------- hostile values at the door


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--delimiter", b"\xff"], "--delimiter: not valid UTF-8"),
        (["--delimiter", ""], "must be the text of one line"),
        (["--delimiter", "a\nb"], "must be the text of one line"),
        (["--text-field", b"t\xfe"], "--text-field: not valid UTF-8"),
        (["--workers", "MAX + 1"], "--workers must be in [1, "),
    ],
)
def test_data_cli_rejects_hostile_values(tmp_path, tok_dir, stories, extra, says):
    if extra[-1] == "MAX + 1":  # e.g. 10**6 would start that many processes
        from src.data.workers import max_workers

        extra = [extra[0], max_workers() + 1]
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories[:50]))
    proc = data_cli("prepare", "--input", corpus, "--tokenizer", tok_dir,
                    "--output", tmp_path / "o", *extra)  # fmt: skip
    one_error_line(proc, says)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_data_cli_refuses_a_fifo_without_waiting(tmp_path):
    fifo = tmp_path / "t.bin"
    os.mkfifo(fifo)
    for argv in (["stats", fifo], ["split", "--input", fifo, "--output",
                                   tmp_path / "s", "--val-tokens", 5]):  # fmt: skip
        one_error_line(data_cli(*argv, timeout=60), str(fifo), "not a file")
