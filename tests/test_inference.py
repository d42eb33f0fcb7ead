"""The generation CLI and the chat REPL on a tiny model trained once per module:
one-shot, batch files (order, count, batched == one by one), user errors,
quantization close to full precision, and the REPL driven by a stdin script."""

import io
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from src.inference import cli as inference
from src.inference.cache import make_cache
from src.inference.chat import CHAT, PLAIN, Chat, command, pick_template, repl
from src.inference.sampling import Sampling

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(train_tiny, tmp_path_factory) -> Path:
    ck, _ = train_tiny(
        tmp_path_factory.mktemp("gen"), training__max_steps=150, eval__interval=150,
        eval__max_tokens=1024, checkpoint__interval=150,
    )  # fmt: skip
    return ck / "best"


def cli(ckpt, *args) -> list[str]:
    return ["--checkpoint", str(ckpt), *args]


def test_one_shot_streams_prompt_and_stats(ckpt, capsys):
    args = [
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "20",
        "--stats",
        "--seed",
        "0",
    ]
    assert inference.main(cli(ckpt, *args)) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time") and out.rstrip().endswith("---")
    assert "prefill" in err and "tok/s decode" in err and "peak memory" in err
    for extra in (["--quantize", "4"], ["--quantize", "8", "--dtype", "bf16"]):
        assert inference.main(cli(ckpt, *args, *extra)) == 0
        out, err = capsys.readouterr()
        assert out.startswith("Once upon a time") and len(out) > 25, out


def test_user_mistakes_exit_2(ckpt, tmp_path, capsys):
    bad = [["--top-p", "0"], ["--temperature", "-1"], ["--output", "x.txt"]]
    bad += [["--seed", "-1"], ["--top-k", "-2"], ["--max-tokens", "-1"]]
    for args in bad:
        assert inference.main(cli(ckpt, *args)) == 2
    assert inference.main(["--checkpoint", str(tmp_path / "none")]) == 2
    assert inference.main(cli(ckpt, "--prompts-file", str(tmp_path / "no"))) == 2
    (tmp_path / "p.txt").write_text("a\n")
    out = ["--prompts-file", str(tmp_path / "p.txt"), "--output", "/no/such/o.txt"]
    assert inference.main(cli(ckpt, *out)) == 2
    assert "error:" in capsys.readouterr().err


def test_batch_file_keeps_order_and_count(ckpt, tmp_path, capsys):
    prompts = ["Once upon a time", "The dog", "", "She said", "Tom", "The cat", "A"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    for name, batch in (("b1.jsonl", "1"), ("b8.jsonl", "8")):
        args = ["--prompts-file", str(tmp_path / "p.txt"), "--output"]
        args += [str(tmp_path / name), "--batch-size", batch, "--temperature", "0"]
        assert inference.main(cli(ckpt, *args, "--max-tokens", "12")) == 0
    rows1, rows8 = (
        [json.loads(x) for x in (tmp_path / n).read_text().splitlines()]
        for n in ("b1.jsonl", "b8.jsonl")
    )
    assert [r["prompt"] for r in rows8] == prompts
    assert [r["completion"] for r in rows1] == [r["completion"] for r in rows8]
    assert max(r["batch_size"] for r in rows8) > 1  # equal-length prompts batched
    assert all(0 < r["generated_tokens"] <= 12 for r in rows8)
    args = ["--prompts-file", str(tmp_path / "p.txt"), "--stats", "--output"]
    assert inference.main(cli(ckpt, *args, str(tmp_path / "o.txt"))) == 0
    assert "7 prompts" in capsys.readouterr().err
    assert (tmp_path / "o.txt").read_text().count("\n---\n") == len(prompts)


def test_quantized_close_to_full_precision(ckpt, tiny_dataset):
    model, tok, _ = inference.load_model(ckpt)
    text = "Once upon a time, there was a little girl named Lily. She liked to play."
    ids = mx.array([tok.encode(text)])
    full = model(ids)
    for bits, kl_max, agree_min in ((8, 0.01, 0.9), (4, 0.3, 0.6)):
        q, _, _ = inference.load_model(ckpt)
        inference.prepare(q, None, bits)
        assert "QuantizedEmbedding" in str(q.model.embed_tokens.__class__)
        got = q(ids)
        lp, lq = (x - mx.logsumexp(x, -1, keepdims=True) for x in (full, got))
        kl = (mx.exp(lp) * (lp - lq)).sum(-1)
        agree = (full.argmax(-1) == got.argmax(-1)).mean().item()
        assert kl.mean().item() < kl_max and agree >= agree_min, (bits, kl, agree)
    bf16, _, _ = inference.load_model(ckpt)
    inference.prepare(bf16, "bf16", 8)
    assert bf16(ids).shape == full.shape


def chat_for(ckpt, template=PLAIN, **kw):
    model, tok, _ = inference.load_model(ckpt)
    s = Sampling(**{"temperature": 0.0, "max_tokens": 8, **kw})
    return Chat(model, tok, s, template, io.StringIO()), model


def test_multi_turn_prefills_only_new_tokens_and_cache_stays_exact(ckpt):
    chat, model = chat_for(ckpt, CHAT)
    chat.say("Hello there")
    first = chat.stats.prompt_tokens
    new = len(chat.tok.encode(CHAT.user.format("Tell me a story")))
    chat.say("Tell me a story")
    assert chat.stats.prompt_tokens <= new + 3 < first + len(chat.tokens) // 2
    # the cache holds exactly a prefix of the transcript: its next-token logits
    # equal a full recompute
    off = chat.cache[0].offset
    rest = mx.array([chat.tokens[off:]])
    cached = model(rest, cache=chat.cache)[:, -1]
    full = model(mx.array([chat.tokens]))[:, -1]
    assert mx.allclose(cached, full, atol=1e-4), np.abs(cached - full).max()


def test_context_full_keeps_recent_tokens(ckpt):
    chat, _ = chat_for(ckpt, max_tokens=20)
    chat.system = "Be kind."
    chat.reset()
    for i in range(6):
        chat.say(f"Turn {i}: the little dog ran to the park and")
        assert len(chat.tokens) <= chat.context
    assert "[context full" in chat.out.getvalue()
    assert chat.tokens[:3] == chat.tok.encode(PLAIN.system.format("Be kind."))[:3]


class CtrlC(io.StringIO):
    """An output that raises KeyboardInterrupt on the 3rd write once armed."""

    armed = 0

    def write(self, s):
        if self.armed:
            self.armed -= 1
            if not self.armed:
                raise KeyboardInterrupt
        return super().write(s)


def test_ctrl_c_stops_the_reply_and_the_repl_goes_on(ckpt):
    model, tok, meta = inference.load_model(ckpt)
    lines = iter(["Once upon a time", "/max_tokens 5", "The dog", "/quit"])
    out = CtrlC()

    def read(_prompt):
        line = next(lines)
        out.armed = 3 if line == "Once upon a time" else 0
        return line

    s = Sampling(temperature=0, max_tokens=30)
    assert repl(model, tok, meta, s, "plain", read, out) == 0
    text = out.getvalue()
    assert "[stopped]" in text and "max_tokens = 5" in text
    reply = text.split("[stopped]")[0].split("/help]")[-1]
    assert 0 < len(reply.strip()) < 40  # stopped after two tokens, not 30


def test_slash_commands(ckpt, tmp_path):
    chat, _ = chat_for(ckpt)
    for line in ["/temp 0.5", "/top_k 7", "/top_p 0.9", "/min_p 0.1", "/seed 3"]:
        assert command(chat, line)
    assert (chat.s.temperature, chat.s.top_k, chat.s.top_p) == (0.5, 7, 0.9)
    assert (chat.s.min_p, chat.s.seed) == (0.1, 3)
    command(chat, "/rep_penalty 0")  # invalid: kept at 1
    assert chat.s.repetition_penalty == 1.0 and "error:" in chat.out.getvalue()
    chat.say("Hi")
    command(chat, f"/save {tmp_path / 't.jsonl'}")
    saved = json.loads((tmp_path / "t.jsonl").read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"], saved
    command(chat, "/reset")
    assert chat.tokens == [] and chat.cache[0].offset == 0
    assert not command(chat, "/quit")


def test_template_choice(ckpt):
    _, tok, meta = inference.load_model(ckpt)
    assert pick_template("auto", tok, meta) is PLAIN
    assert pick_template("auto", tok, {**meta, "chat_template": True}) is CHAT
    ids = tok.encode(CHAT.user.format("hi"))
    assert ids[0] == tok.encode("<|user|>")[0] and len(tok.encode("<|end|>")) == 1


def test_repl_end_to_end_through_stdin(ckpt, tmp_path):
    script = "\n".join(
        [
            "/help",
            "Once upon a time",
            "/temp 0",
            "/max_tokens 6",
            "/stats",
            "/system You tell stories.",
            "The cat",
            "/reset",
            f"/save {tmp_path / 'chat.txt'}",
            "/nonsense",
        ]
    )  # ends without /quit: end of input (Ctrl-D) leaves with 0
    proc = subprocess.run(
        [sys.executable, "-m", "src.inference", *cli(ckpt, "--interactive")],
        input=script + "\n",
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for want in ["/rep_penalty", "temperature = 0.0", "max_tokens = 6", "tok/s"]:
        assert want in out, out
    assert "[conversation reset]" in out and "unknown command" in out
    assert (tmp_path / "chat.txt").exists() and "Traceback" not in proc.stderr


PTY_CHILD = """
import os, sys, time
os.close(os.open(os.ttyname(0), os.O_RDWR))  # session leader: the pty becomes our
# controlling terminal, so a Ctrl-C typed into it is a SIGINT, as in a real shell
import src.inference.streaming as tg
add = tg.TextStreamer.add  # slow the stream so the Ctrl-C lands mid-reply
tg.TextStreamer.add = lambda self, t: (time.sleep(0.05), add(self, t))[1]
from src.inference import cli as inference
sys.exit(inference.main(sys.argv[1:]))
"""


def test_repl_through_a_pseudo_terminal_ctrl_c_and_ctrl_d(ckpt):
    """Keys typed into a real terminal: Ctrl-C mid-reply stops it (the REPL goes
    on), Ctrl-C at the prompt gives a new prompt, Ctrl-D leaves with status 0."""
    import os
    import pty
    import select
    import time

    master, slave = pty.openpty()
    argv = [
        sys.executable,
        "-c",
        PTY_CHILD,
        *cli(ckpt, "--interactive", "--no-history"),
    ]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    seen = b""

    def expect(text: str, timeout: float = 60) -> str:
        nonlocal seen
        end = time.time() + timeout
        while text.encode() not in seen:
            assert time.time() < end, f"no {text!r} in {seen.decode(errors='replace')}"
            if select.select([master], [], [], 0.1)[0]:
                seen += os.read(master, 4096)
        before, _, seen = seen.partition(text.encode())
        return before.decode(errors="replace")

    try:
        expect(">>> ")
        os.write(master, b"/temp 0\r")
        expect(">>> ")
        os.write(master, b"Once upon a time\r")
        expect("Once upon a time\r\n")  # the echo; then the reply streams
        time.sleep(0.6)  # ~10 tokens in (the child sleeps 50 ms a token)
        os.write(master, b"\x03")
        reply = expect("[stopped]")
        assert 0 < len(reply.strip()) and "Traceback" not in reply
        expect(">>> ")
        os.write(master, b"\x03")  # at the prompt: a fresh prompt
        expect(">>> ")
        os.write(master, b"/stats\r")
        assert "tok/s" in expect(">>> ")
        os.write(master, b"\x04")  # Ctrl-D on an empty line: end of input
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ids_past_the_tokenizer_are_never_sampled(temperature):
    """A model whose embedding has more rows than its tokenizer has pieces (a
    padded vocabulary) never hands out an id the tokenizer cannot decode, even
    when those rows dominate the logits; without the limit it would."""
    from src.config import ModelConfig
    from src.inference.generate import generate_step
    from src.model.transformer import Model

    n_tok, rows = 40, 48
    model = Model(ModelConfig(vocab_size=rows, d_model=32, n_layers=1, n_heads=2,
                              context_length=32, tie_embeddings=False))  # fmt: skip
    w = np.array(model.lm_head.weight)
    w[n_tok:] = 50.0 * np.sign(w[:n_tok].sum(0))  # the padded rows win every time
    model.lm_head.weight = mx.array(w)
    s = Sampling(temperature=temperature, seed=3, max_tokens=12)
    prompt = mx.array([[1, 5, 7]])
    free = [int(y.item()) for y in generate_step(model, prompt, s, None)]
    assert max(free) >= n_tok  # the limit is what keeps them out
    for cache in (None, make_cache(model)):
        ids = [
            int(y.item()) for y in generate_step(model, prompt, s, cache, n_vocab=n_tok)
        ]
        assert len(ids) == 12 and max(ids) < n_tok, ids
