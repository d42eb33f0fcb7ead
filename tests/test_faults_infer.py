"""Issue 15, inference, conversion and evaluation, each case through the real
command (`python -m src.X` in a subprocess): nothing made is lost (item 8),
nothing is written over (items 3, 21), a malformed input or option ends in one
`error:` line and exit 2 (items 11, 12, 13)."""

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from src.checkpoint import store
from src.checkpoint.contents import build_meta
from src.model.transformer import Model
from src.tokenizer.spm import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run(module: str, *args, input=None, timeout=120) -> subprocess.CompletedProcess:
    """`python -m src.<module> ARGS`; args may be bytes (argv that is not UTF-8)."""
    argv = [sys.executable, "-m", f"src.{module}"]
    argv += [a if isinstance(a, bytes) else str(a) for a in args]
    proc = subprocess.run(
        argv, cwd=ROOT, capture_output=True, input=input, timeout=timeout
    )
    proc.err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in proc.err, proc.err
    return proc


def user_error(proc, *words) -> str:
    """Assert exit 2 with one `error:` line holding `words`; that line."""
    lines = proc.err.strip().splitlines()
    assert proc.returncode == 2, proc.err
    assert lines and lines[-1].startswith(("error: ", "python -m src.")), proc.err
    assert all(w in lines[-1] for w in words), (words, proc.err)
    return lines[-1]


def digest(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, tiny_config, tmp_path_factory) -> Path:
    """A run folder with one checkpoint (step 7) of a random tiny model, with
    optimizer state, as a training run leaves it."""
    cfg = tiny_config(vocab_size=512, d_model=32, context_length=64)
    mx.random.seed(0)
    weights = dict(tree_flatten(Model(cfg.model).parameters()))
    optimizer = {k + ".m": mx.zeros_like(v) + 0.5 for k, v in weights.items()}
    meta = build_meta(cfg, Tokenizer.load(tiny_dataset["tokenizer"]).sha256)
    out = tmp_path_factory.mktemp("faults") / "run"
    store.save_checkpoint(out, 7, weights, optimizer, meta, tiny_dataset["tokenizer"])
    return out


@pytest.fixture(scope="module")
def ckpt(run_dir) -> Path:
    return run_dir / "latest"


@pytest.fixture(scope="module")
def hf_dir(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    proc = run("convert", "--checkpoint", ckpt, "--to", "hf", "--out", out)
    assert proc.returncode == 0, proc.err
    return out


# ------------------------------------------------ item 8: Ctrl-C keeps results


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_item8_signal_during_prompts_file_keeps_completed(ckpt, tmp_path, sig):
    prompts = [f"Once upon a time {i}" for i in range(400)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "src.inference", "--checkpoint", str(ckpt),
            "--prompts-file", str(tmp_path / "p.txt"), "--output", str(out),
            "--batch-size", "2", "--max-tokens", "40", "--temperature", "0"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 60
        while not (out.exists() and out.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.time() < end, "no result written"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(rows) < len(prompts)
    assert [r["prompt"] for r in rows] == prompts[: len(rows)]  # in order, whole
    name = signal.Signals(sig).name
    assert f"stopped by {name}: {len(rows)} of 400 prompts completed" in err, err


def test_item8_results_stream_to_stdout(ckpt, tmp_path):
    """Without --output each result reaches stdout as soon as it is made."""
    (tmp_path / "p.txt").write_text("".join(f"The dog {i}\n" for i in range(300)))
    argv = [sys.executable, "-m", "src.inference", "--checkpoint", str(ckpt),
            "--prompts-file", str(tmp_path / "p.txt"), "--batch-size", "1",
            "--max-tokens", "40"]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        first = b""
        while not first.endswith(b"\n---\n"):  # the first result, while it runs
            line = proc.stdout.readline()
            assert line, "stdout closed before the first result"
            first += line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in err, err
    assert first.startswith(b"The dog 0")
    assert b"prompts completed (written to stdout)" in err


# --------------------------------------- items 3, 21: nothing is written over


def test_item3_import_never_replaces_a_checkpoint(run_dir, hf_dir, tmp_path):
    before = digest(run_dir)
    proc = run("convert", "--from", "hf", hf_dir, "--out", run_dir)
    user_error(proc, str(run_dir), "step_00000007", "new --out")
    assert digest(run_dir) == before  # fp32 weights and optimizer state intact
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "thesis.txt").write_text("mine")
    user_error(run("convert", "--from", "hf", hf_dir, "--out", other), "sub")
    assert (other / "thesis.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # no temp left
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new"):
        proc = run("convert", "--from", "hf", hf_dir, "--out", out)
        assert proc.returncode == 0, proc.err
        assert (out / "latest" / "COMMIT").exists()


def test_item21_torch_export_never_overwrites(ckpt, tmp_path):
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"precious")
    proc = run("convert", "--checkpoint", ckpt, "--to", "torch", "--out", pt)
    user_error(proc, str(pt), "already exists")
    assert pt.read_bytes() == b"precious"
    full = tmp_path / "hf"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    user_error(run("convert", "--checkpoint", ckpt, "--to", "hf", "--out", full))
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.pt"]


def test_item21_failed_exports_leave_nothing(ckpt, tmp_path, monkeypatch, capsys):
    """A write that fails half way (torch.save; the tokenizer files of --to hf)
    leaves no temp file or folder and no output, and one error line."""
    import errno

    from src.convert import cli as convert
    from src.convert import hf

    torch = pytest.importorskip(
        "torch", reason="the torch extra: pip install -e .[torch]"
    )

    def torch_full(*_a, **_k):  # torch reports I/O failures as RuntimeError
        raise RuntimeError("[enforce fail at inline_container.cc] write failed")

    def disk_full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_full)
    monkeypatch.setattr(hf, "write_hf_tokenizer", disk_full)
    args = ["--checkpoint", str(ckpt), "--out"]
    assert convert.main([*args, str(tmp_path / "m.pt"), "--to", "torch"]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert convert.main([*args, str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_item21_inference_outputs_never_overwrite(ckpt, tmp_path):
    (tmp_path / "p.txt").write_text("Once\n")
    out = tmp_path / "o.txt"
    out.write_text("old results")
    proc = run("inference", "--checkpoint", ckpt, "--prompts-file",
               tmp_path / "p.txt", "--output", out)  # fmt: skip
    user_error(proc, str(out), "already exists")
    assert out.read_text() == "old results"
    script = f"Once\n/save {out}\n/save {tmp_path / 'new.txt'}\n/quit\n".encode()
    proc = run("inference", "--checkpoint", ckpt, "--interactive", "--max-tokens",
               "3", input=script)  # fmt: skip
    assert proc.returncode == 0 and b"already exists" in proc.stdout, proc.stdout
    assert out.read_text() == "old results"
    saved = json.loads((tmp_path / "new.txt").read_text())  # one JSONL row
    assert saved["messages"][0] == {"role": "user", "content": "Once"}


# ---------------------------------------- item 11: every number checked


@pytest.mark.parametrize(
    "option, value",
    [
        ("--frequency-penalty", "inf"),
        ("--presence-penalty", "-inf"),
        ("--repetition-penalty", "nan"),
        ("--repetition-penalty", "0"),
        ("--temperature", "1e999"),
        ("--temperature", "-0.5"),
        ("--top-p", "0"),
        ("--min-p", "1"),
        ("--top-k", "1e3"),
        ("--repetition-window", str(10**20)),
        ("--seed", str(2**64)),
        ("--max-tokens", "-1"),
        ("--batch-size", "0"),
    ],
)
def test_item11_inference_numbers_checked(ckpt, option, value):
    proc = run(
        "inference", "--checkpoint", ckpt, "--prompt", "Once", f"{option}={value}"
    )
    user_error(proc, option, repr(value))


def test_item11_extreme_valid_options_are_defined(ckpt):
    """A temperature or top-p that rounds to 0 in float32 samples greedily (not
    NaN), and penalties at their limits keep every logit finite."""
    pen = ["--frequency-penalty", "100", "--presence-penalty", "-100",
           "--repetition-penalty", "0.01", "--repetition-window", str(2**31 - 1)]  # fmt: skip
    common = ["--checkpoint", ckpt, "--prompt", "Once upon", "--max-tokens", "12"]
    texts = []
    for knobs in (["--temperature", "0"], ["--temperature", "1e-300"],
                  ["--top-p", "1e-300", "--temperature", "1"]):  # fmt: skip
        proc = run("inference", *common, *pen, *knobs)
        assert proc.returncode == 0, proc.err
        texts.append(proc.stdout)
    assert texts[0] == texts[1] == texts[2], texts


def test_item11_repl_options_checked(ckpt):
    script = b"/temp inf\n/rep_penalty nan\n/top_p 0\n/max_tokens 99999999999\n"
    proc = run("inference", "--checkpoint", ckpt, "--interactive", input=script)
    assert proc.returncode == 0, proc.err
    assert proc.stdout.count(b"error: ") == 4, proc.stdout


@pytest.mark.parametrize("option, value", [("--batch-size", "inf"),
                                           ("--max-tokens", "nan")])  # fmt: skip
def test_item11_eval_numbers_checked(ckpt, tiny_corpus, option, value):
    proc = run("eval", "--checkpoint", ckpt, "--data", tiny_corpus, option, value)
    user_error(proc, option)


# ------------------------------------- item 12: text that is not UTF-8


def test_item12_prompt_argv_not_utf8(ckpt):
    proc = run("inference", "--checkpoint", ckpt, "--prompt", b"Once \xff upon")
    user_error(proc, "--prompt", "not valid UTF-8", "0xff")
    proc = run("inference", "--checkpoint", ckpt, "--prompt", "ok", "--stop", b"\xfe")
    user_error(proc, "--stop", "0xfe")


def test_item12_prompts_file_not_utf8(ckpt, tmp_path):
    (tmp_path / "p.txt").write_bytes(b"Once upon\nthe \xc3( cat\n")
    proc = run("inference", "--checkpoint", ckpt, "--prompts-file",
               tmp_path / "p.txt", "--output", tmp_path / "o.jsonl")  # fmt: skip
    user_error(proc, str(tmp_path / "p.txt"), "line 2", "UTF-8")
    assert not (tmp_path / "o.jsonl").exists()


def test_item12_repl_line_not_utf8_goes_on(ckpt):
    script = b"Once\nthe \xff cat\n/temp 0.5\nThe dog\n/quit\n"
    proc = run("inference", "--checkpoint", ckpt, "--interactive", "--max-tokens",
               "4", input=script)  # fmt: skip
    assert proc.returncode == 0, proc.err
    out = proc.stdout.decode()
    assert "error: that line is not valid UTF-8 (byte 0xff" in out, out
    assert "temperature = 0.5" in out  # the conversation went on
    assert out.count(">>> ") == 5, out


def test_item12_eval_text_not_utf8(ckpt, tiny_corpus, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(tiny_corpus.read_bytes()[:5000] + b"\n\xff\xfe\n")
    user_error(run("eval", "--checkpoint", ckpt, "--data", bad), str(bad), "UTF-8")
    proc = run("eval", "--checkpoint", ckpt, "--data", tiny_corpus, "--delimiter",
               b"\xff")  # fmt: skip
    user_error(proc, "--delimiter", "UTF-8")


# ------------------------------------ item 13: a malformed Hugging Face folder


def _edit(hf_dir: Path, tmp: Path, config=None, raw=None, weights=None) -> Path:
    """A copy of `hf_dir` with config.json replaced (a dict of changes, or raw
    bytes) or model.safetensors replaced (bytes, or a function of its bytes)."""
    import shutil

    folder = tmp / "bad"
    shutil.copytree(hf_dir, folder)
    if config is not None:
        good = json.loads((hf_dir / "config.json").read_text())
        raw = json.dumps({**good, **config}).encode()
    if raw is not None:
        (folder / "config.json").write_bytes(raw)
    if weights is not None:
        data = (hf_dir / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(weights(data))
    return folder


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(raw=b"[1, 2]"), "expected a JSON object, got list"),
        (dict(raw=b"{nope"), "not valid JSON"),
        (dict(raw=b'{"model_type": "ll\xffama"}'), "not UTF-8"),
        (dict(config={"hidden_size": None}), "hidden_size"),
        (dict(config={"num_attention_heads": "4"}), "num_attention_heads='4'"),
        (dict(config={"num_attention_heads": 0}), "num_attention_heads=0"),
        (dict(config={"vocab_size": 10**15}), "vocab_size"),
        (dict(config={"max_position_embeddings": 10**12}), "max_position_embeddings"),
        (dict(config={"rope_parameters": [1]}), "rope_parameters"),
        (dict(config={"rms_norm_eps": -1}), "rms_norm_eps"),
        (dict(config={"tie_word_embeddings": "false"}), "tie_word_embeddings"),
        (dict(config={"mlx_slm_trainer": [1]}), "mlx_slm_trainer"),
        (dict(config={"intermediate_size": 64}), "do not match config.json"),
        (dict(weights=lambda b: b[: len(b) // 2]), "model.safetensors: damaged"),
        (dict(weights=lambda b: b"\0" * 64), "model.safetensors: damaged"),
    ],
)
def test_item13_malformed_hf_folder(hf_dir, tmp_path, change, words):
    folder = _edit(hf_dir, tmp_path, **change)
    proc = run("convert", "--from", "hf", folder, "--out", tmp_path / "out")
    user_error(proc, str(folder), words)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no temp left


def test_item13_non_finite_weights_named(hf_dir, tmp_path):
    weights = mx.load(str(hf_dir / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] * float("nan")
    folder = _edit(hf_dir, tmp_path)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    proc = run("convert", "--from", "hf", folder, "--out", tmp_path / "out")
    user_error(proc, "model.safetensors", name, "NaN")
    assert not (tmp_path / "out").exists()
