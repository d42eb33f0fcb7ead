"""Issue 19, the first hour of a new user, each case through the real command
(`python -m src.X` in a subprocess): a run folder is a checkpoint (its best, else
its latest), a missing tokenizer or token file names the command that makes it,
Ctrl-C ends a one-shot generation cleanly, `--temp`, `--prompt` with
`--interactive`, and a random (printed, reproducible) default seed."""

import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from commands import run, user_error
from mlx.utils import tree_flatten

from src.checkpoint import store
from src.checkpoint.contents import build_meta
from src.model.transformer import Model
from src.tokenizer.spm import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def make_run(tiny_dataset, tiny_config, tmp_path_factory):
    """A factory: make_run(name, context, {step: val_loss or None}) -> a run folder
    of random tiny models saved as a training run saves them (links included)."""
    sha = Tokenizer.load(tiny_dataset["tokenizer"]).sha256
    root = tmp_path_factory.mktemp("next")

    def make(name: str, context: int, steps: dict) -> Path:
        cfg = tiny_config(vocab_size=512, d_model=32, context_length=context)
        out = root / name
        for step, metric in steps.items():
            mx.random.seed(step)
            weights = dict(tree_flatten(Model(cfg.model).parameters()))
            optimizer = {k + ".m": mx.zeros_like(v) for k, v in weights.items()}
            store.save_checkpoint(
                out,
                step,
                weights,
                optimizer,
                build_meta(cfg, sha),
                tiny_dataset["tokenizer"],
                metric=metric,
            )
        return out

    return make


@pytest.fixture(scope="module")
def run_dir(make_run) -> Path:
    """Step 5 is the best (lowest validation loss), step 9 the latest."""
    return make_run("short", 64, {5: 1.0, 9: 2.0})


@pytest.fixture(scope="module")
def long_run(make_run) -> Path:
    """A 4096-token context (a long generation), only a `latest` link."""
    return make_run("long", 4096, {3: None})


# ------------------------------------------- item 1: a run folder is accepted


def test_item1_run_folder_means_best_else_latest(
    run_dir, long_run, tiny_dataset, tmp_path
):
    args = ["--prompt", "Once", "--max-tokens", "8", "--temperature", "0"]
    by_run = run("inference", "--checkpoint", run_dir, *args)
    assert by_run.returncode == 0, by_run.stderr
    assert by_run.stderr.splitlines()[0] == f"using {run_dir}/best (step 5)"
    by_best = run("inference", "--checkpoint", run_dir / "best", *args)
    assert by_run.stdout == by_best.stdout and "using" not in by_best.stderr

    latest = run("inference", "--checkpoint", long_run, *args)
    assert latest.returncode == 0, latest.stderr
    assert latest.stderr.splitlines()[0] == f"using {long_run}/latest (step 3)"

    ev = run(
        "eval",
        "--checkpoint",
        run_dir,
        "--data",
        tiny_dataset["val"],
        "--max-tokens",
        "256",
        "--json",
    )
    assert ev.returncode == 0 and '"step": 5' in ev.stdout, ev.stderr
    assert f"using {run_dir}/best (step 5)" in ev.stderr

    out = tmp_path / "model.pt"
    conv = run("convert", "--checkpoint", run_dir, "--to", "torch", "--out", out)
    assert conv.returncode == 0 and out.is_file(), conv.stderr
    assert f"using {run_dir}/best (step 5)" in conv.stderr


def test_item1_neither_checkpoint_nor_run_folder_says_what_to_pass(tmp_path):
    (tmp_path / "empty").mkdir()
    for module, extra in (("inference", []), ("eval", ["--data", "x.bin"])):
        proc = run(module, "--checkpoint", tmp_path / "empty", *extra)
        line = user_error(proc, str(tmp_path / "empty"), "pass", "run folder")
        assert "COMMIT" not in line  # not a damaged checkpoint: not one at all


# ----------------------------- item 2: missing inputs name the command to make them


def test_item2_missing_tokenizer_names_the_commands(tmp_path, tiny_corpus):
    proc = run(
        "data",
        "prepare",
        "--input",
        tiny_corpus,
        "--tokenizer",
        "data/tokenizer-8192",
        "--output",
        "data/x",
        cwd=tmp_path,
    )
    user_error(
        proc,
        "no tokenizer at data/tokenizer-8192",
        "python -m src.tokenizer train --input",
        "--output data/tokenizer-8192",
        "`VOCAB_SIZE=8192 ./scripts/prepare_data.sh`",
    )
    elsewhere = tmp_path / "tokenizer-4096"
    proc = run(
        "data",
        "prepare",
        "--input",
        tiny_corpus,
        "--tokenizer",
        elsewhere,
        "--output",
        tmp_path / "x",
    )
    user_error(
        proc,
        f"--output {elsewhere} --vocab-size 4096",
        f"TOKENIZER={elsewhere} VOCAB_SIZE=4096 ./scripts/prepare_data.sh",
    )


def test_item2_missing_token_file_names_prepare(run_dir, tmp_path):
    missing = tmp_path / "tokens" / "val.bin"
    proc = run("eval", "--checkpoint", run_dir / "latest", "--data", missing)
    user_error(
        proc,
        f"{missing}: token file not found",
        "python -m src.data prepare --input",
        "--tokenizer",
        f"--output {missing.parent}",
    )


# ------------------------------------------------ item 3: Ctrl-C in a one-shot


def test_item3_ctrl_c_during_one_shot_stops_cleanly(long_run):
    argv = [
        sys.executable,
        "-m",
        "src.inference",
        "--checkpoint",
        str(long_run / "latest"),
        "--prompt",
        "Once",
        "--max-tokens",
        "100000",
        "--temperature",
        "0",
    ]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        first = proc.stdout.read(40)  # the prompt and some generated text
        assert proc.poll() is None, "generation ended before the Ctrl-C"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out, err = (first + rest).decode(), err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip() == "interrupted", err
    assert out.startswith("Once") and len(out) >= 40
    assert out.endswith("\n") and "---" not in out, out[-200:]


# ---------------------------------------------------- item 4: --temp is an alias


def test_item4_temp_is_temperature(run_dir):
    args = [
        "--checkpoint",
        run_dir / "latest",
        "--prompt",
        "Once",
        "--max-tokens",
        "20",
        "--seed",
        "3",
    ]
    for value in ("0", "0.5"):
        short = run("inference", *args, "--temp", value)
        long = run("inference", *args, "--temperature", value)
        assert short.returncode == 0, short.stderr
        assert short.stdout == long.stdout


# ------------------------------------- item 5: --prompt with --interactive


def test_item5_prompt_is_the_first_repl_message(run_dir):
    args = [
        "--checkpoint",
        run_dir / "latest",
        "--interactive",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
    ]
    given = run("inference", *args, "--prompt", "Once upon a time", input="/stats\n")
    typed = run("inference", *args, input="Once upon a time\n/stats\n")
    assert given.returncode == typed.returncode == 0, given.stderr
    # typed: ">>> " + reply (stdin is not echoed); given: the prompt is shown
    _, _, after = given.stdout.partition(">>> Once upon a time\n")
    reply = after.split(">>> ")[0]
    assert reply.strip() and reply == typed.stdout.split(">>> ")[1], given.stdout
    assert "generated 0 tokens" not in given.stdout  # /stats: the prompt's reply
    assert "tok/s decode" in given.stdout  # and the REPL went on reading stdin


# ------------------------------------------- item 6: a random, printed seed


def seed_of(stderr: str) -> int:
    lines = [x for x in stderr.splitlines() if x.startswith("seed ")]
    assert len(lines) == 1, stderr
    seed = int(lines[0].split()[1])
    assert lines[0] == f"seed {seed} (pass --seed {seed} to reproduce)"
    return seed


def test_item6_default_seed_is_random_printed_and_reproducible(run_dir):
    args = [
        "--checkpoint",
        run_dir / "latest",
        "--prompt",
        "Once",
        "--max-tokens",
        "40",
        "--temperature",
        "1",
    ]
    a, b = run("inference", *args), run("inference", *args)
    assert a.returncode == b.returncode == 0, a.stderr
    assert a.stdout != b.stdout and seed_of(a.stderr) != seed_of(b.stderr)
    again = run("inference", *args, "--seed", seed_of(a.stderr))
    assert again.stdout == a.stdout and "seed" not in again.stderr
    greedy = run("inference", *args[:-2], "--temperature", "0")
    assert greedy.returncode == 0 and "seed" not in greedy.stderr
