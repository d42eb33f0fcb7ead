"""Evaluation: the bits-per-byte arithmetic on a hand-computed case, and the
`python -m src.eval` CLI on a tiny trained checkpoint (text, token file,
--compare, --json, user mistakes), agreeing with the trainer's own log."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from src.data.loader import TokenLoader
from src.data.tokens import write_tokens
from src.eval import cli as ev

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 1024


class ByteDecoder:
    """decode(ids) = one ASCII letter per id, except id 3 (EOS) -> ""."""

    def __call__(self, ids):
        return "".join("" if i == 3 else chr(ord("a") + i % 26) for i in ids)


def test_bits_per_byte_hand_computed(tmp_path):
    """Uniform logits over V: loss = ln V per token; bpb = tokens ln V / ln 2 / bytes."""
    V, L = 16, 8
    ids = np.arange(4 * L + 1) % V  # 4 windows; id 3 is an EOS: 0 bytes
    write_tokens(tmp_path / "t.bin", ids, V)
    loader = TokenLoader(tmp_path / "t.bin", L, V)
    evaluator = ev.Evaluator(
        loader, batch_size=3, max_tokens=None, decode=ByteDecoder()
    )

    def uniform_loss_sum(batch):  # a stub model: every logit 0
        B, T = batch.shape
        return mx.array(B * (T - 1) * math.log(V))

    r = evaluator(uniform_loss_sum)
    targets = ids[1 : 4 * L + 1]
    n_bytes = int(np.sum(targets != 3))
    assert r.tokens == 4 * L and r.bytes == n_bytes == 30
    assert abs(r.loss - math.log(V)) < 1e-6
    assert abs(r.perplexity - V) < 1e-4
    expected = 4 * L * math.log(V) / math.log(2) / n_bytes  # = 32 * 4 / 30 bits
    assert abs(r.bits_per_byte - expected) < 1e-6, (r.bits_per_byte, expected)
    assert abs(expected - 128 / 30) < 1e-12
    # max_tokens rounds up to whole windows
    assert ev.Evaluator(loader, 2, 9, ByteDecoder()).tokens == 2 * L


def test_model_loss_matches_reference(tmp_path):
    """make_eval_fn's summed loss equals a plain log-softmax sum (stub embedding)."""
    import mlx.nn as nn

    from src.eval.evaluator import make_eval_fn

    class Stub(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = mx.random.normal((10, 10), key=mx.random.key(0))

        def __call__(self, x):
            return self.table[x]

    model = Stub()
    batch = mx.array(np.random.default_rng(0).integers(0, 10, (2, 6)), mx.int32)
    got = make_eval_fn(model, compile=False)(batch).item()
    logp = np.asarray(model.table) - np.log(
        np.exp(np.asarray(model.table)).sum(-1, keepdims=True)
    )
    b = np.asarray(batch)
    want = -sum(logp[b[i, j], b[i, j + 1]] for i in range(2) for j in range(5))
    assert abs(got - want) < 1e-4, (got, want)


# ---------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def run(train_tiny, tiny_dataset, tmp_path_factory) -> dict:
    """A 30-step tiny run (eval at steps 15 and 30 on MAX_TOKENS val tokens)."""
    tmp = tmp_path_factory.mktemp("evalrun")
    ck, logs = train_tiny(
        tmp, logging__interval=5, eval__max_tokens=MAX_TOKENS, eval__sample_tokens=8,
        eval__interval=15, checkpoint__interval=15, training__max_steps=30,
        model__dropout=0.0,
    )  # fmt: skip
    return {"ck": ck, "logs": logs, "val": tiny_dataset["val"], "tmp": tmp}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = ev.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_token_file_matches_training_log(run, capsys):
    rows = [json.loads(x) for x in (run["logs"] / "metrics.jsonl").open()]
    last = [r for r in rows if r["event"] == "eval"][-1]
    assert last["step"] == 30
    code, out, err = cli(
        capsys, "--checkpoint", run["ck"] / "latest", "--data", run["val"],
        "--max-tokens", MAX_TOKENS, "--json",
    )  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["kind"] == "tokens" and r["step"] == 30 and r["tokens"] == MAX_TOKENS
    assert abs(r["loss"] - last["val_loss"]) < 1e-5, (r["loss"], last["val_loss"])
    assert abs(r["bits_per_byte"] - last["val_bpb"]) < 1e-5
    assert r["tokens"] == last["val_tokens"] and r["windows"] == MAX_TOKENS // 64
    # another batch size: the same windows, the same loss up to float rounding
    code, out, _ = cli(
        capsys, "--checkpoint", run["ck"] / "latest", "--data", run["val"],
        "--max-tokens", MAX_TOKENS, "--batch-size", 3, "--json",
    )  # fmt: skip
    assert code == 0 and abs(json.loads(out)["loss"] - r["loss"]) < 1e-5


def test_cli_text_equals_its_token_file(run, tiny_dataset, capsys, tmp_path):
    """Raw text is tokenized as `prepare` writes documents (tokens EOS): the text
    of the val split's documents scores exactly as val.bin."""
    from src.data.tokens import open_tokens
    from src.tokenizer.spm import Tokenizer

    tok = Tokenizer.load(tiny_dataset["tokenizer"])
    ids = np.asarray(open_tokens(run["val"]))
    ends = np.flatnonzero(ids == tok.eos_id)
    docs = [tok.decode(d) for d in np.split(ids, ends + 1)[:-1]]
    text = tmp_path / "val.txt"
    text.write_text("".join(f"{d}\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    ck = run["ck"] / "latest"
    code, out, err = cli(capsys, "--checkpoint", ck, "--data", text, "--json")
    assert code == 0, err
    t = json.loads(out)
    code, out, _ = cli(capsys, "--checkpoint", ck, "--data", run["val"], "--json")
    b = json.loads(out)
    assert t["kind"] == "text" and t["tokens"] == b["tokens"] > MAX_TOKENS
    assert abs(t["loss"] - b["loss"]) < 1e-5 and t["bytes"] == b["bytes"]
    assert t["text_bytes"] >= t["bytes"]
    # --max-tokens stops reading the text early; the same first windows score
    argv = ["--checkpoint", ck, "--max-tokens", 200, "--json", "--data"]
    code, out, _ = cli(capsys, *argv, text)
    t2 = json.loads(out)
    code, out, _ = cli(capsys, *argv, run["val"])
    assert t2["tokens"] == json.loads(out)["tokens"] == 256
    assert abs(t2["loss"] - json.loads(out)["loss"]) < 1e-5
    # the plain-text report states the method and the numbers
    code, out, _ = cli(capsys, "--checkpoint", ck, "--data", text)
    assert code == 0 and "non-overlapping" in out and "bits/byte" in out
    assert f"{t['bits_per_byte']:.4f}" in out and f"{t['tokens']:,}" in out


def test_cli_compare(run, tiny_corpus, capsys):
    a, b = run["ck"] / "step_00000015", run["ck"] / "step_00000030"
    argv = ["--compare", a, b, "--data", tiny_corpus, "--max-tokens", 512]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["checkpoint", "step", "params"]
    assert str(a) in lines[2] and str(b) in lines[3] and "non-overlapping" in out
    code, out, _ = cli(capsys, *argv, "--json")
    r15, r30 = json.loads(out)
    assert (r15["step"], r30["step"]) == (15, 30)
    assert r30["loss"] < r15["loss"] and r15["tokens"] == r30["tokens"] == 512


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_checkpoint", "no such checkpoint folder"),
        ("no_data", "no such file or folder"),
        ("no_token_file", "token file not found"),
        ("garbage_bin", "not a token file"),
        ("short_text", "fewer than context_length + 1"),
        ("empty_text", "no text in it"),
        ("not_a_checkpoint", "neither a checkpoint (no meta.json) nor a run folder"),
        ("links_gone", "holds checkpoints but no best or latest link: pass one"),
    ],
)
def test_cli_user_mistakes(run, capsys, tmp_path, case, message):
    ck, data = run["ck"] / "latest", run["val"]
    if case == "no_checkpoint":
        ck = tmp_path / "nope"
    elif case == "no_data":
        data = tmp_path / "nope.txt"
    elif case == "no_token_file":
        data = tmp_path / "nope.bin"
    elif case == "garbage_bin":
        (data := tmp_path / "x.bin").write_bytes(b"hello world" * 10)
    elif case == "short_text":
        (data := tmp_path / "x.txt").write_text("Once upon a time.\n")
    elif case == "empty_text":
        (data := tmp_path / "x.txt").write_text("\n<|endoftext|>\n")
    elif case == "links_gone":  # e.g. the rewound-* folder of a rewind
        ck = tmp_path / "aside"
        target = (run["ck"] / "latest").resolve()
        shutil.copytree(target, ck / target.name)
    elif case == "not_a_checkpoint":
        (ck := tmp_path / "empty").mkdir()
    code, out, err = cli(capsys, "--checkpoint", ck, "--data", data)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err


def test_cli_argument_errors_exit_2(run, capsys):
    ck = str(run["ck"] / "latest")
    for argv in (
        ["--checkpoint", ck, "--data", "x", "--max-tokens", "0"],
        ["--checkpoint", ck, "--data", "x", "--batch-size", "-1"],
        ["--checkpoint", ck, "--compare", ck, "--data", "x"],
        ["--data", "x"],
    ):
        assert ev.main(argv) == 2
        assert "error:" in capsys.readouterr().err


def test_cli_subprocess_help_and_error():
    proc = subprocess.run(
        [sys.executable, "-m", "src.eval", "--checkpoint", "nope", "--data", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_encode_text_documents_and_early_stop(tiny_dataset, tmp_path, monkeypatch):
    from src.tokenizer.spm import Tokenizer

    tok = Tokenizer.load(tiny_dataset["tokenizer"])
    docs = [f"Story {i}: the cat sat on the mat." for i in range(10)]
    path = tmp_path / "d.txt"
    path.write_text("\n<|endoftext|>\n".join(docs) + "\n\n<|endoftext|>\n")
    ids, n_bytes = ev.encode_text(str(path), tok, "<|endoftext|>")
    want = [i for d in docs for i in tok.encode(d, eos=True)]
    assert ids.tolist() == want and n_bytes == sum(map(len, docs))
    monkeypatch.setattr(ev, "ENCODE_BATCH", 2)
    one = len(tok.encode(docs[0], eos=True))
    ids, n_bytes = ev.encode_text(str(path), tok, "<|endoftext|>", max_tokens=one)
    assert ids.tolist() == want[: len(ids)] and len(ids) > one
    assert n_bytes == len(docs[0]) + len(docs[1])
