"""Issue 19, the chat REPL, each case through the real command
(`python -m src.inference --interactive` in a subprocess, lines on stdin): the
quit words and /clear, indented commands, /system with no argument, /show and
/set, /save as JSONL that `prepare --chat` reads, and the warning when one
message does not fit the context."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from src.checkpoint import store
from src.checkpoint.contents import build_meta
from src.model.transformer import Model
from src.tokenizer.spm import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 64


@pytest.fixture(scope="module")
def ckpt(tok_dir, tiny_config, tmp_path_factory) -> Path:
    """A run folder holding one random tiny model (context 64)."""
    cfg = tiny_config(vocab_size=400, d_model=32, context_length=CONTEXT)
    out = tmp_path_factory.mktemp("repl") / "run"
    mx.random.seed(0)
    weights = dict(tree_flatten(Model(cfg.model).parameters()))
    optimizer = {k + ".m": mx.zeros_like(v) for k, v in weights.items()}
    meta = build_meta(cfg, Tokenizer.load(tok_dir).sha256)
    store.save_checkpoint(out, 1, weights, optimizer, meta, tok_dir, metric=1.0)
    return out


def module(name: str, *args, stdin: str = "", env=None) -> subprocess.CompletedProcess:
    """`python -m src.<name> ARGS` with `stdin`; never a traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", f"src.{name}", *map(str, args)],
        input=stdin,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def repl(ckpt, *lines: str, env=None) -> str:
    """Run the REPL (greedy, seed 0) on `lines`; its stdout, after exit 0."""
    args = ["--checkpoint", ckpt, "--interactive", "--temperature", "0"]
    proc = module("inference", *args, stdin="\n".join(lines) + "\n", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# ---------------------------------- item 1: quit words, /clear, indented commands


@pytest.mark.parametrize("word", ["q", "exit", "quit", "/bye", "QUIT", "  /quit"])
def test_quit_words_end_the_repl(ckpt, word):
    out = repl(ckpt, word, "/temp 0.5")  # never reached
    assert "temperature = 0.5" not in out and out.count(">>> ") == 1, out


def test_clear_is_reset_and_indented_slash_is_a_command(ckpt):
    out = repl(
        ckpt, "/max_tokens 3", "Once upon a time", "/clear", "/stats", "   /help"
    )
    assert "[conversation reset]" in out and "unknown command" not in out, out
    assert f"; 0/{CONTEXT} tokens in context]" in out, out
    assert "commands:" in out and "/clear" in out.split("commands:")[1], out


# ----------------------------------------- item 2: /system shows, /system clear


def test_system_without_argument_shows_it(ckpt):
    out = repl(ckpt, "/system", "/system Be brief.", "/system", "/system clear",
               "/system", "/help")  # fmt: skip
    assert out.count("[system prompt set") == 1, out
    assert out.count("no system prompt") == 2, out
    assert "system prompt: 'Be brief.'" in out, out
    assert "[system prompt removed; conversation reset]" in out, out
    assert "/system clear" in out.split("commands:")[1], out


# ------------------------------------------------------------ item 3: /show, /set


def test_show_and_set(ckpt):
    out = repl(
        ckpt,
        "/set",
        "/set top_k 5",
        "/set temp 0.3",
        "/set repetition_window 16",
        "/set top_p 2",  # outside its limits: kept at 1
        "/set top_k many",
        "/set nonsense 1",
        "/system Be brief.",
        "/show",
        "/help",
    )
    listing = out.split("settings (/set NAME VALUE):")[1]
    assert "temperature (or temp): a number in [0, 100] (0 = greedy)" in listing
    assert "temperature (or temp): a number" in listing and "max_tokens:" in listing, (
        out
    )
    assert "error: top_p: expected a number in (0, 1]" in out, out
    assert "error: top_k: expected an integer" in out, out
    assert "error: no setting 'nonsense'" in out, out
    block = next(part for part in out.split(">>> ") if "template = " in part)
    for want in ["temperature = 0.3", "top_k = 5", "top_p = 1.0", "min_p = 0.0",
                 "repetition_penalty = 1.0", "repetition_window = 16",
                 "max_tokens = 200", "seed = 0", "template = plain",
                 "system = 'Be brief.'", f"/{CONTEXT} tokens used"]:  # fmt: skip
        assert want in block, (want, block)
    help_text = out.split("commands:")[1]
    assert "/show" in help_text and "/set NAME VALUE" in help_text, out


# ------------------------------------------------------- item 4: /save as JSONL


def test_save_writes_jsonl_that_prepare_chat_reads(ckpt, tok_dir, tmp_path):
    home = {"HOME": str(tmp_path)}
    out = repl(ckpt, "/max_tokens 5", "/system Be brief.", "Once upon a time",
               "/save ~/chat.jsonl", "/save ~/chat.jsonl", "/system clear",
               "The dog", "/save ~/two.jsonl", env=home)  # fmt: skip
    saved = tmp_path / "chat.jsonl"
    assert f"[saved {saved}]" in out and "already exists" in out, out
    lines = saved.read_text().splitlines()
    assert len(lines) == 1, lines
    messages = json.loads(lines[0])["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert [m["content"] for m in messages[:2]] == ["Be brief.", "Once upon a time"]
    # two conversations, one each for the train and validation splits
    files = [saved, tmp_path / "two.jsonl", "--val-fraction", "0.5", "--min-words", "0"]
    args = ["--input", *files, "--tokenizer", tok_dir, "--output", tmp_path / "d"]
    proc = module("data", "prepare", *args, "--chat")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["chat_template"]


# ---------------------------------------------- item 5: an over-long message


def test_a_message_longer_than_the_context_is_cut_with_a_warning(ckpt):
    long = " ".join(["the little dog ran to the park"] * 20)
    out = repl(ckpt, "/max_tokens 4", "Hi", long, "/stats")
    warnings = [x for x in out.splitlines() if "warning:" in x]
    assert len(warnings) == 1, out
    got = re.search(r"the message has (\d+) tokens.*dropped its first (\d+)", out)
    assert got, out
    n, dropped = map(int, got.groups())
    assert n > CONTEXT and 0 < dropped and n - dropped < CONTEXT, out
    assert "the conversation before it" in warnings[0], out
    assert "[context full" not in out, out  # one line, not two
