"""Issue 19, the chat REPL, each case through the real command
(`python -m src.inference --interactive` in a subprocess, lines on stdin, or
keys typed into a pseudo-terminal where readline matters): the quit words and
/clear, indented commands, /system with no argument, /show and /set, /save as
JSONL that `prepare --chat` reads, the warning when one message does not fit
the context (and the chat markers it keeps), triple-quote multi-line messages and
pastes, /seed + /reset reproducing a reply, and the history file."""

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from src.checkpoint import store
from src.checkpoint.contents import build_meta
from src.model.transformer import Model
from src.tokenizer.spm import Tokenizer

# A pseudo-terminal read with timeouts: run alone (scripts/test.sh).
pytestmark = pytest.mark.serial

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


def repl(ckpt, *lines: str, env=None, args=()) -> str:
    """Run the REPL (greedy, seed 0) on `lines`; its stdout, after exit 0."""
    args = ["--checkpoint", ckpt, "--interactive", "--temperature", "0", *args]
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


def test_a_cut_message_keeps_the_chat_markers(ckpt):
    """Cut to fit, the user turn still starts with <|user|> and ends with
    <|end|><|assistant|>: only the message loses its first tokens."""
    from src.checkpoint.contents import load_model
    from src.inference.chat import Chat
    from src.inference.sampling import Sampling
    from src.template import CHAT

    model, tok, _ = load_model(str(ckpt), None)
    out = io.StringIO()
    chat = Chat(model, tok, Sampling(temperature=0, max_tokens=4), CHAT, out)
    long = " ".join(["the little dog ran to the park"] * 20)
    chat.say(long)
    user, end_assistant = tok.encode("<|user|>"), tok.encode("<|end|><|assistant|>")
    body = tok.encode(CHAT.user.format(long))[len(user) : -len(end_assistant)]
    kept = len(chat.tokens) - len(user) - len(end_assistant) - 4 - 1  # 4 + <|end|>
    assert 0 < kept < len(body), (kept, len(body))
    turn = user + body[-kept:] + end_assistant
    assert chat.tokens[: len(turn)] == turn, (chat.tokens, turn)
    got = re.search(
        r"the message has (\d+) tokens.*dropped its first (\d+)", out.getvalue()
    )
    assert got and int(got[2]) == len(body) - kept, out.getvalue()
    # and through the command: the warning, then a reply in the chat template
    text = repl(ckpt, "/max_tokens 4", long, "/stats", args=["--template", "chat"])
    assert "[chat template" in text and text.count("warning:") == 1, text
    assert f"; {len(turn) + 4 + 1}/{CONTEXT} tokens in context]" in text, text


# ------------------------------------- multi-line messages (triple quotes, paste)


def saved_messages(path: Path) -> list[dict]:
    return json.loads(path.read_text())["messages"]


def test_triple_quotes_make_one_message_and_piped_input_keeps_no_history(
    ckpt, tmp_path
):
    out = repl(ckpt, "/max_tokens 2", '"""', "line one", "  /temp 0.5", "", "last",
               '  """  ', '"""', "/temp 0.7", '"""', '"""', "q", '"""',
               f"/save {tmp_path / 'a.jsonl'}", '"""', "never sent",
               env={"HOME": str(tmp_path)})  # fmt: skip
    assert "temperature = 0." not in out and out.count("... ") == 5 + 2 + 2 + 2, out
    users = [m["content"] for m in saved_messages(tmp_path / "a.jsonl")][::2]
    # a one-line block is a message too, even a command or a quit word
    assert users == ["line one\n  /temp 0.5\n\nlast", "/temp 0.7", "q"], users
    assert '[unfinished """ message not sent]' in out, out
    assert not (tmp_path / ".slm_chat_history").exists()  # piped: no history
    help_text = repl(ckpt, "/help").split("commands:")[1]
    for want in ['(""")', "/seed N", "seed + k", "history file", "Tab"]:
        assert want in help_text, (want, help_text)


# ------------------------------------------------ through a pseudo-terminal


class Terminal:
    """The REPL on a pseudo-terminal (100 columns, stdin, stdout and stderr),
    as a user at a terminal has it: `type` keys, `expect` output."""

    def __init__(self, ckpt, *args, home: Path):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        argv = [sys.executable, "-m", "src.inference", "--checkpoint", str(ckpt),
                "--interactive", "--temperature", "0", *map(str, args)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(home),
               "TERM": "xterm", "INPUTRC": os.devnull}  # fmt: skip
        # a session of its own with the pty as its controlling terminal, so a
        # Ctrl-C typed is a SIGINT, as in a real shell
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )  # fmt: skip
        os.close(slave)
        self.master, self.seen, self.screen = master, b"", b""

    def type(self, keys: str | bytes) -> None:
        os.write(self.master, keys.encode() if isinstance(keys, str) else keys)

    def expect(self, text: str, timeout: float = 60) -> str:
        """What came before `text` (waiting for it), which is then consumed."""
        end = time.time() + timeout
        while text.encode() not in self.seen:
            assert time.time() < end, f"no {text!r} in {self.seen.decode()!r}"
            if select.select([self.master], [], [], 0.1)[0]:
                chunk = os.read(self.master, 4096)
                self.seen, self.screen = self.seen + chunk, self.screen + chunk
        before, _, self.seen = self.seen.partition(text.encode())
        return before.decode(errors="replace")

    def line(self, keys: str) -> str:
        """Type `keys` and Enter; all printed up to the next prompt."""
        self.type(keys + "\r")
        return self.expect(">>> ")

    def close(self) -> str:
        """Ctrl-D; exit status 0; all it showed."""
        self.type(b"\x04")
        try:
            assert self.proc.wait(timeout=30) == 0
            while select.select([self.master], [], [], 0.1)[0]:
                self.screen += os.read(self.master, 4096)
        except OSError:  # EIO: the child closed its end
            pass
        finally:
            self.proc.kill()
            os.close(self.master)
        return self.screen.decode(errors="replace")


def test_a_bracketed_paste_is_one_message_and_ctrl_c_drops_a_block(ckpt, tmp_path):
    """A multi-line paste (readline's bracketed paste) is one message; Ctrl-C
    inside a triple-quote block drops it and the next line is a command again."""
    term = Terminal(ckpt, "--max-tokens", "2", home=tmp_path)
    term.expect(">>> ")
    term.line("\x1b[200~first line\nsecond line\x1b[201~")
    term.type('"""\rdropped\r')
    term.expect("... dropped\r\n... ")
    term.type(b"\x03")
    term.expect(">>> ")
    assert "temperature = 0.5" in term.line("/temp 0.5")
    term.line(f"/save {tmp_path / 'p.jsonl'}")
    term.close()
    messages = saved_messages(tmp_path / "p.jsonl")
    assert [m["role"] for m in messages] == ["user", "assistant"], messages
    assert messages[0]["content"] == "first line\nsecond line", messages


def reply(term: Terminal, message: str) -> str:
    term.type(message + "\r")
    term.expect(message + "\r\n")  # the echo; then the reply
    return term.expect(">>> ").strip()


def test_seed_and_reset_reproduce_a_reply(ckpt, tmp_path):
    """/seed 7 + a message, /reset + /seed 7 + the same message: the same reply;
    the second reply of a conversation and another seed draw others."""
    term = Terminal(ckpt, "--no-history", home=tmp_path)
    term.expect(">>> ")
    for keys in ("/temp 1", "/max_tokens 12", "/seed 7"):
        term.line(keys)
    first = reply(term, "Once upon a time")
    second = reply(term, "Once upon a time")  # reply 1: seed 8, other context
    assert "replies = 2 (the next draws with seed + 2)" in term.line("/show")
    runs = []
    for seed in (7, 8, 7):
        assert "[conversation reset]" in term.line("/reset")
        assert f"seed = {seed}" in term.line(f"/seed {seed}")
        runs.append(reply(term, "Once upon a time"))
    term.close()
    assert first and runs[0] == first and runs[2] == first, (first, runs)
    assert runs[1] != first and second != first, (first, second, runs)
    assert not (tmp_path / ".slm_chat_history").exists()  # --no-history


def test_history_is_kept_between_sessions(ckpt, tmp_path):
    """Entries typed in one session (default file under ~) come back with the
    up arrow in the next; a multi-line entry is one; Tab completes commands."""
    term = Terminal(ckpt, "--max-tokens", "2", home=tmp_path)
    term.expect(">>> ")
    term.line("/top_k 5")
    term.type('"""\rone\rtwo\r"""\r')
    term.expect(">>> ")
    term.line("/temp 0.25")
    term.close()
    path = tmp_path / ".slm_chat_history"
    assert path.stat().st_mode & 0o777 == 0o600  # it holds the conversations
    assert path.read_text() == '/top_k 5\n"""\none\ntwo\n"""\n/temp 0.25\n'
    term = Terminal(ckpt, "--history", path, home=tmp_path / "elsewhere")
    term.expect(">>> ")
    assert "temperature = 0.25" in term.line("\x1b[A")  # the last entry
    assert "top_k = 5" in term.line("\x1b[A\x1b[A\x1b[A")  # multi-line is one
    assert "template = " in term.line("/sho\t")  # Tab completes /show
    assert "max_tokens = 7" in term.line("/set max_t\t7")
    term.close()
    entries = path.read_text().splitlines()
    assert entries[-3:] == ["/top_k 5", "/show ", "/set max_tokens 7"], entries


def test_a_broken_history_file_warns_once_and_the_repl_goes_on(ckpt, tmp_path):
    """Unreadable (a folder; a FIFO, which must not hang the start): one warning
    at the start. Unwritable from the first entry on (a folder made there after
    the start): one warning, not one per line. The REPL works and exits 0."""
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for bad in ("dir", "fifo"):
        term = Terminal(ckpt, "--history", tmp_path / bad, home=tmp_path)
        term.expect(">>> ", timeout=30)
        assert "temperature = 0.5" in term.line("/temp 0.5")
        screen = term.close()
        assert screen.count("warning: cannot read the history file") == 1, screen
        assert "Traceback" not in screen, screen
    later = tmp_path / "later"
    term = Terminal(ckpt, "--history", later, home=tmp_path)
    term.expect(">>> ")
    later.mkdir()
    assert "temperature = 0.5" in term.line("/temp 0.5")
    assert "top_k = 3" in term.line("/top_k 3")
    screen = term.close()
    assert screen.count("warning: cannot write the history file") == 1, screen
    assert "Traceback" not in screen, screen


def test_history_flags_need_interactive(ckpt, tmp_path):
    for flags in (["--history", tmp_path / "h"], ["--no-history"]):
        proc = module("inference", "--checkpoint", ckpt, "--prompt", "Hi", *flags)
        assert proc.returncode == 2, proc.stderr
        assert f"error: {flags[0]} needs --interactive" in proc.stderr, proc.stderr
    both = ["--interactive", "--history", tmp_path / "h", "--no-history"]
    proc = module("inference", "--checkpoint", ckpt, *both)
    assert proc.returncode == 2 and "not allowed with" in proc.stderr, proc.stderr
    assert not (tmp_path / "h").exists()
