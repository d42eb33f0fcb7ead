"""The chat REPL (`python -m src.inference --checkpoint DIR --interactive`).

The conversation stays in the KV cache: `Chat.tokens` is the transcript, the cache
holds a prefix of it, and a turn prefills only what the cache lacks (normally the
new user turn). When the context would overflow, the system prompt and the most
recent tokens are kept and the cache is rebuilt from them (RoPE positions
change, so it cannot be shifted in place). A message longer than the context
keeps its last tokens, with a warning; the template's markers around it stay.
Reply k of a conversation (k = 0 after a reset) samples with seed + k, so a
reply depends only on the settings and the conversation so far. /save writes the
conversation as one JSONL row in the Hugging Face `messages` layout (what
`python -m src.data prepare --chat` reads) to a new file, never over one.

The loop is `repl`; what it reads (lines, \"\"\" blocks, history) is
`lineinput`, the slash commands are `chat_commands`. Ctrl-C stops a reply,
Ctrl-D leaves. A line that is not valid UTF-8 is refused with a message; the
conversation goes on. The CLI's --prompt, if any, is the first message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import mlx.core as mx

from ..errors import UserError
from ..files import atomic_file
from ..template import CHAT, PLAIN, Template
from .cache import make_cache
from .chat_commands import COMMANDS, NAMES, QUIT, command
from .generate import Stats, generate_step
from .lineinput import HISTORY, LineReader
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
        # the user turn's markers: what comes before and after the message
        before, after = template.user.split("{}")
        self.around = [tokenizer.encode(x) if x else [] for x in (before, after)]
        self.system, self.stats = "", Stats()
        self.reset()

    def reset(self) -> None:
        """A new conversation (the system prompt stays); the next reply is reply 0."""
        self.cache, self.tokens, self.transcript = make_cache(self.model), [], []
        self.replies = 0
        if self.system:
            self.tokens = self.tok.encode(self.t.system.format(self.system))
            self.transcript.append(("system", self.system))

    def user_turn(self, text: str, budget: int) -> tuple[list[int], int]:
        """The user turn of `text` as ids, at most `budget` of them when that can
        be done: a longer one keeps the template's markers and the message's last
        tokens. Also returns how many tokens the message lost."""
        turn = self.tok.encode(self.t.user.format(text))
        (before, after), n = self.around, len(turn)
        if n <= budget:
            return turn, 0
        body = turn[len(before) : n - len(after)]
        if turn[: len(before)] != before or turn[n - len(after) :] != after:
            body = self.tok.encode(text)  # the text merged with a marker: apart
        keep = max(budget - len(before) - len(after), 1)
        return before + body[-keep:] + after, max(len(body) - keep, 0)

    def _fit(self, text: str, room: int) -> list[int]:
        """The user turn of `text`, made to fit with `room` reply tokens: drop the
        oldest tokens after the system prompt (then it too) and rebuild the cache
        from what is kept. A message that alone leaves no `room` loses its first
        tokens (the markers stay), with a warning."""
        new, lost = self.user_turn(text, budget := self.context - room)
        if lost:
            before = " and the conversation before it" if self.tokens else ""
            print(
                f"warning: the message has {len(new) + lost} tokens with its "
                f"markers, more than fit the context ({self.context}, {room} kept "
                f"for the reply); dropped its first {lost}{before}",
                file=self.out,
            )
            self.tokens, self.cache = [], make_cache(self.model)
            return new
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
        new = self._fit(text, room)
        self.tokens += new  # after _fit, which may replace self.tokens
        prompt = mx.array([self.tokens[self.cache[0].offset :]])  # not yet cached
        n_new = min(self.s.max_tokens, self.context - len(self.tokens) - self.n_end)
        seed = (self.s.seed + self.replies) % (LIMITS["seed"].hi + 1)
        s = dataclasses.replace(self.s, seed=seed)
        self.replies, self.stats = self.replies + 1, Stats()
        streamer, fed = TextStreamer(self.tok, s.stop), list(self.tokens)
        history = mx.array([self.tokens])
        steps = generate_step(
            self.model, prompt, s, self.cache, history, n_new, self.stats,
            n_vocab=self.tok.vocab_size,
        )  # fmt: skip
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
        drop = offset - same
        if not all(c.trim(drop) == drop for c in self.cache):
            self.cache = make_cache(self.model)  # a ring cannot forget: refill

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


def repl(
    model,
    tokenizer,
    meta: dict,
    sampling: Sampling,
    template: str = "auto",
    inp=input,
    out=sys.stdout,
    first: Sequence[str] = (),
    history: str | None = HISTORY,
) -> int:
    """Read entries until /quit or end of input; return the exit status. The
    lines of `first` (the CLI's --prompt) come before the input's. `history` is
    the history file (None: none), used when the input is a terminal."""
    reader = LineReader(out, inp, first, history, COMMANDS, sorted(NAMES))
    chat = Chat(
        model, tokenizer, sampling, pick_template(template, tokenizer, meta), out
    )
    print(f"[{chat.t.name} template, context {chat.context}; /help]", file=out)
    while True:
        try:
            line, message = reader.read()
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print(file=out)
            continue
        try:
            check_utf8(line, "that message" if message else "that line")
        except UserError as exc:
            print(f"error: {exc}; nothing was sent, go on", file=out)
            continue
        if not message and line.strip().lower() in QUIT:
            return 0
        if not message and line.lstrip().startswith("/"):
            if not command(chat, line):
                return 0
        elif line.strip():
            try:
                chat.say(line)
            except KeyboardInterrupt:  # before the reply began: no cache to trust
                print(" [stopped]", file=out)
                chat.cache = make_cache(chat.model)  # refilled from chat.tokens
