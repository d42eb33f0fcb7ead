"""The chat REPL's slash commands: parsing, /help, /show, /set and the rest.

`command(chat, line)` runs one and says whether the REPL goes on; it talks to the
conversation (`src.inference.chat.Chat`) through its settings (`chat.s`), its
system prompt, `reset()`, `save()` and `stats`, and prints to `chat.out`. A
setting outside its `LIMITS` is an `error:` line and keeps the old value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from ..files import write_failure
from .sampling import LIMITS

HELP = """commands:
  /help              this list
  /show              every current setting
  /set NAME VALUE    set one (/set alone lists the names and their limits)
  /temp X  /top_k N  /top_p X  /min_p X  /rep_penalty X  /max_tokens N
                     set a sampling option (no argument: show it)
  /seed N            set the sampling seed (no argument: show it); each reply
                     depends only on the settings and the conversation so far:
                     reply k (k = 0 after a reset) draws with seed + k, so
                     /reset, /seed N and the same messages give the same replies
  /system TEXT       set the system prompt and reset the conversation
  /system            show the system prompt
  /system clear      remove it and reset the conversation
  /reset  /clear     start a new conversation (keeps the system prompt)
  /save FILE.jsonl   write the conversation as one {"messages": [...]} row, the
                     layout `python -m src.data prepare --chat` reads (a new file)
  /stats             tokens and speed of the last reply
  /quit  /bye        leave (also q, quit, exit or Ctrl-D); Ctrl-C stops a reply
a line starting with / (after any spaces) is a command, anything else a message;
a line of three double quotes (\"\"\") starts a multi-line message and another
such line sends it (a multi-line paste is one message too); on a terminal,
up/down recall earlier input (kept in the history file) and Tab completes
commands"""

QUIT = {"/quit", "/bye", "q", "quit", "exit"}  # a whole line, any case
OPTIONS = {  # command -> the Sampling field it sets (parsed as that field's type)
    "/temp": "temperature", "/top_k": "top_k", "/top_p": "top_p", "/min_p": "min_p",
    "/rep_penalty": "repetition_penalty", "/max_tokens": "max_tokens", "/seed": "seed",
}  # fmt: skip
NAMES = {**{k[1:]: v for k, v in OPTIONS.items()}, **{k: k for k in LIMITS}}
COMMANDS = sorted({*OPTIONS, "/help", "/show", "/set", "/system", "/reset",
                   "/clear", "/save", "/stats", "/quit", "/bye"})  # fmt: skip


def set_option(chat, field: str, arg: str) -> None:
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


def show(chat) -> str:
    """Every current setting, one `name = value` a line."""
    rows = [(name, getattr(chat.s, name)) for name in LIMITS]
    rows += [("stop", chat.s.stop), ("template", chat.t.name)]
    rows += [("system", repr(chat.system) if chat.system else "(none)")]
    rows += [("context", f"{len(chat.tokens)}/{chat.context} tokens used")]
    rows += [("replies", f"{chat.replies} (the next draws with seed + {chat.replies})")]
    return "\n".join(f"{name} = {value}" for name, value in rows)


def list_settings(out) -> None:
    print("settings (/set NAME VALUE):", file=out)
    for field, limit in LIMITS.items():
        short = [k for k, v in NAMES.items() if v == field and k != field]
        alias = f" (or {short[0]})" if short else ""
        print(f"  {field}{alias}: {limit.rule()}", file=out)


def save(chat, arg: str) -> None:
    if not arg:
        print("usage: /save FILE.jsonl", file=chat.out)
        return
    path = os.path.expanduser(arg)
    try:
        chat.save(path)
        print(f"[saved {path}]", file=chat.out)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=chat.out)
    except OSError as exc:
        print(f"error: {write_failure(path, exc)}", file=chat.out)


def command(chat, line: str) -> bool:
    """Run one slash command; False means quit."""
    name, _, arg = line.strip().partition(" ")
    arg, out = arg.strip(), chat.out
    if name.lower() in QUIT:
        return False
    if name in OPTIONS:
        set_option(chat, OPTIONS[name], arg)
    elif name == "/set" and not arg:
        list_settings(out)
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
    elif name == "/save":
        save(chat, arg)
    elif name == "/stats":
        used = f"{len(chat.tokens)}/{chat.context} tokens in context"
        print(f"[{chat.stats.summary()}; {used}]", file=out)
    else:
        print(HELP if name == "/help" else f"unknown command {line!r}; /help", file=out)
    return True
