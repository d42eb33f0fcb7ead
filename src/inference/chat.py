"""The chat REPL (`python -m src.inference --checkpoint DIR --interactive`).

The conversation stays in the KV cache: `Chat.tokens` is the transcript, the cache
holds a prefix of it, and a turn prefills only what the cache lacks (normally the
new user turn). When the context would overflow, the system prompt and the most
recent tokens are kept and the cache is rebuilt from them (RoPE positions
change, so it cannot be shifted in place). Ctrl-C stops a reply, Ctrl-D leaves.
A line that is not valid UTF-8 is refused with a message; the conversation goes
on. /save writes the conversation as one JSONL row in the Hugging Face
`messages` layout (what `python -m src.data prepare --chat` reads) to a new file,
never over one. A message longer than the context keeps its last tokens, with a
warning. The CLI's --prompt, if any, is the first message.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from collections.abc import Sequence

import mlx.core as mx

from ..errors import UserError
from ..files import atomic_file, write_failure
from ..template import CHAT, PLAIN, Template
from .cache import make_cache
from .generate import Stats, generate_step
from .sampling import LIMITS, Sampling
from .streaming import TextStreamer, check_utf8


def pick_template(name: str, tokenizer, meta: dict) -> Template:
    """`auto`: chat markers if the tokenizer has them as single tokens and the
    checkpoint's meta.json says the model was trained with them, else plain."""
    if name != "auto":
        return CHAT if name == "chat" else PLAIN
    has = all(len(tokenizer.encode(m)) == 1 for m in ("<|user|>", "<|end|>"))
    return CHAT if has and meta.get("chat_template") else PLAIN


class Chat:
    """A conversation over one KV cache; `say` streams a reply to `out`."""

    def __init__(self, model, tokenizer, sampling: Sampling, template: Template, out):
        self.model, self.tok, self.s, self.t = model, tokenizer, sampling, template
        self.out, self.context = out, model.config.context_length
        markers = {tokenizer.encode(m)[0] for m in template.stop_markers}
        self.stop_ids = {tokenizer.eos_id} | markers
        self.n_end = len(tokenizer.encode(template.reply_end))
        self.system, self.stats, self.turns = "", Stats(), 0
        self.reset()

    def reset(self) -> None:
        self.cache, self.tokens, self.transcript = make_cache(self.model), [], []
        if self.system:
            self.tokens = self.tok.encode(self.t.system.format(self.system))
            self.transcript.append(("system", self.system))

    def _fit(self, new: list[int], room: int) -> list[int]:
        """Make `new` and `room` reply tokens fit: drop the oldest tokens after the
        system prompt (then it too) and rebuild the cache from what is kept. A
        message that alone leaves no `room` keeps its last tokens, with a warning."""
        if len(new) > (budget := self.context - room):
            before = " and the conversation before it" if self.tokens else ""
            print(
                f"warning: the message has {len(new)} tokens, more than fit the "
                f"context ({self.context}, {room} kept for the reply); dropped its "
                f"first {len(new) - budget}{before}",
                file=self.out,
            )
            self.tokens, self.cache = [], make_cache(self.model)
            return new[-budget:]
        if len(self.tokens) + len(new) + room <= self.context:
            return new
        head = self.tok.encode(self.t.system.format(self.system)) if self.system else []
        head = head if len(head) + len(new) + room <= self.context else []
        keep = self.context - room - len(new) - len(head)
        self.tokens = head + (self.tokens[len(head) :][-keep:] if keep else [])
        self.cache = make_cache(self.model)
        print(f"[context full: keeping the last {keep} tokens]", file=self.out)
        return new

    def say(self, text: str) -> str:
        """Add a user turn, stream the reply to `out`, return its text."""
        room = min(self.s.max_tokens, self.context // 2) + self.n_end
        new = self._fit(self.tok.encode(self.t.user.format(text)), room)
        self.tokens += new  # after _fit, which may replace self.tokens
        prompt = mx.array([self.tokens[self.cache[0].offset :]])  # not yet cached
        n_new = min(self.s.max_tokens, self.context - len(self.tokens) - self.n_end)
        s = dataclasses.replace(self.s, seed=self.s.seed + self.turns)
        self.turns, self.stats = self.turns + 1, Stats()
        streamer, fed = TextStreamer(self.tok, s.stop), list(self.tokens)
        history = mx.array([self.tokens])
        steps = generate_step(
            self.model, prompt, s, self.cache, history, n_new, self.stats
        )
        try:
            for y in steps:
                fed.append(token := y.item())
                if token in self.stop_ids:
                    break
                self.out.write(streamer.add(token))
                self.out.flush()
                if streamer.stopped:
                    break
            else:
                if n_new < self.s.max_tokens:
                    self.out.write(streamer.finish() + " [context full: reply cut]")
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        steps.close()
        self.out.write(streamer.finish() + "\n")
        reply, n_prompt = streamer.text, len(self.tokens)
        # the sampled ids, unless a stop string cut the text inside one of them
        ids = fed[n_prompt:] if not streamer.stopped else self.tok.encode(reply)
        ids = [i for i in ids if i not in self.stop_ids]
        self.tokens = (self.tokens + ids + self.tok.encode(self.t.reply_end))[
            -self.context :
        ]
        self._trim_cache(fed)
        self.transcript += [("user", text), ("assistant", reply)]
        return reply

    def _trim_cache(self, fed: list[int]) -> None:
        """Keep only the cached positions that agree with `self.tokens` (the cache
        may hold a stop token or tokens that re-encoding the reply changed)."""
        if len({c.offset for c in self.cache}) > 1:  # Ctrl-C between two layers
            self.cache = make_cache(self.model)
            return
        offset = self.cache[0].offset
        same = 0
        for a, b in zip(fed[:offset], self.tokens):
            if a != b:
                break
            same += 1
        for c in self.cache:
            c.trim(offset - same)

    def save(self, path: str) -> None:
        """Write the transcript to a new file (FileExistsError if there is one) as
        one JSONL line, {"messages": [{"role", "content"}, ...]}: the Hugging Face
        chat layout that `python -m src.data prepare --chat` reads."""
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; /save to a new file")
        if not self.transcript:
            raise ValueError("nothing to save yet")
        messages = [{"role": r, "content": text} for r, text in self.transcript]
        with atomic_file(path, "w", replace=False) as f:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


HELP = """commands:
  /help              this list
  /show              every current setting
  /set NAME VALUE    set one (/set alone lists the names and their limits)
  /temp X  /top_k N  /top_p X  /min_p X  /rep_penalty X  /max_tokens N  /seed N
                     set a sampling option (no argument: show it)
  /system TEXT       set the system prompt and reset the conversation
  /system            show the system prompt
  /system clear      remove it and reset the conversation
  /reset  /clear     forget the conversation (keeps the system prompt)
  /save FILE.jsonl   write the conversation as one {"messages": [...]} row, the
                     layout `python -m src.data prepare --chat` reads (a new file)
  /stats             tokens and speed of the last reply
  /quit  /bye        leave (also q, quit, exit or Ctrl-D); Ctrl-C stops a reply
a line starting with / (after any spaces) is a command, anything else a message"""

QUIT = {"/quit", "/bye", "q", "quit", "exit"}  # a whole line, any case
OPTIONS = {  # command -> the Sampling field it sets (parsed as that field's type)
    "/temp": "temperature", "/top_k": "top_k", "/top_p": "top_p", "/min_p": "min_p",
    "/rep_penalty": "repetition_penalty", "/max_tokens": "max_tokens", "/seed": "seed",
}  # fmt: skip
NAMES = {**{k[1:]: v for k, v in OPTIONS.items()}, **{k: k for k in LIMITS}}


def set_option(chat: Chat, field: str, arg: str) -> None:
    """Set the Sampling `field` from `arg` within its LIMITS (an error keeps the
    old value), then show it."""
    if arg:
        try:
            value = LIMITS[field].parse(arg)
            chat.s = dataclasses.replace(chat.s, **{field: value}).check()
        except (ValueError, argparse.ArgumentTypeError) as exc:
            print(f"error: {field}: {exc}", file=chat.out)
            return
    print(f"{field} = {getattr(chat.s, field)}", file=chat.out)


def show(chat: Chat) -> str:
    """Every current setting, one `name = value` a line."""
    rows = [(name, getattr(chat.s, name)) for name in LIMITS]
    rows += [("stop", chat.s.stop), ("template", chat.t.name)]
    rows += [("system", repr(chat.system) if chat.system else "(none)")]
    rows += [("context", f"{len(chat.tokens)}/{chat.context} tokens used")]
    return "\n".join(f"{name} = {value}" for name, value in rows)


def command(chat: Chat, line: str) -> bool:
    """Run one slash command; False means quit."""
    name, _, arg = line.strip().partition(" ")
    arg, out = arg.strip(), chat.out
    if name.lower() in QUIT:
        return False
    if name in OPTIONS:
        set_option(chat, OPTIONS[name], arg)
    elif name == "/set" and not arg:
        print("settings (/set NAME VALUE):", file=out)
        for field, limit in LIMITS.items():
            short = [k for k, v in NAMES.items() if v == field and k != field]
            alias = f" (or {short[0]})" if short else ""
            print(f"  {field}{alias}: {limit.rule()}", file=out)
    elif name == "/set":
        key, _, value = arg.partition(" ")
        if key in NAMES and value.strip():
            set_option(chat, NAMES[key], value.strip())
        elif key in NAMES:
            print(f"usage: /set {key} VALUE ({LIMITS[NAMES[key]].rule()})", file=out)
        else:
            print(f"error: no setting {key!r}; /set lists them", file=out)
    elif name == "/show":
        print(show(chat), file=out)
    elif name in ("/reset", "/clear"):
        chat.reset()
        print("[conversation reset]", file=out)
    elif name == "/system" and not arg:
        now = f"system prompt: {chat.system!r}" if chat.system else "no system prompt"
        print(f"[{now}; /system TEXT sets it, /system clear removes it]", file=out)
    elif name == "/system":
        chat.system = "" if arg == "clear" else arg
        chat.reset()
        done = "removed" if arg == "clear" else "set"
        print(f"[system prompt {done}; conversation reset]", file=out)
    elif name == "/save" and not arg:
        print("usage: /save FILE.jsonl", file=out)
    elif name == "/save":
        path = os.path.expanduser(arg)
        try:
            chat.save(path)
            print(f"[saved {path}]", file=out)
        except (FileExistsError, ValueError) as exc:
            print(f"error: {exc}", file=out)
        except OSError as exc:
            print(f"error: {write_failure(path, exc)}", file=out)
    elif name == "/stats":
        used = f"{len(chat.tokens)}/{chat.context} tokens in context"
        print(f"[{chat.stats.summary()}; {used}]", file=out)
    else:
        print(HELP if name == "/help" else f"unknown command {line!r}; /help", file=out)
    return True


def repl(
    model,
    tokenizer,
    meta: dict,
    sampling: Sampling,
    template: str = "auto",
    inp=input,
    out=sys.stdout,
    first: Sequence[str] = (),
) -> int:
    """Read lines until /quit or end of input; return the exit status. The
    lines of `first` (the CLI's --prompt) come before the input's, shown after
    the `>>> ` prompt as if typed."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    if inp is input and isinstance(sys.stdin, io.TextIOWrapper):
        # bytes that are not UTF-8 come in as lone surrogates (refused below)
        # rather than as a UnicodeDecodeError that would end the conversation
        sys.stdin.reconfigure(errors="surrogateescape")
    chat = Chat(
        model, tokenizer, sampling, pick_template(template, tokenizer, meta), out
    )
    print(f"[{chat.t.name} template, context {chat.context}; /help]", file=out)
    queued = list(first)
    while True:
        try:
            if queued:
                line = queued.pop(0)
                print(f">>> {line}", file=out)
            else:
                line = inp(">>> ")
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print(file=out)
            continue
        try:
            check_utf8(line, "that line")
        except UserError as exc:
            print(f"error: {exc}; nothing was sent, go on", file=out)
            continue
        if line.strip().lower() in QUIT:
            return 0
        if line.lstrip().startswith("/"):
            if not command(chat, line):
                return 0
        elif line.strip():
            try:
                chat.say(line)
            except KeyboardInterrupt:  # before the reply began: no cache to trust
                print(" [stopped]", file=out)
                chat.cache = make_cache(chat.model)  # refilled from chat.tokens
