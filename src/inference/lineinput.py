"""What the REPL reads: one entry (a command or a message) at a time.

A line is an entry. A line that is exactly `\"\"\"` (spaces around it allowed)
starts a multi-line message and the next such line ends it: the lines between
are one message, newlines kept (as in ollama). An input that already holds
newlines (a bracketed paste, which GNU readline hands over whole, or a recalled
multi-line entry) is one message as it is.

When stdin and stdout are a terminal, line editing is the standard library's
`readline` (GNU readline or libedit; no extra dependency): up/down recall
earlier entries, Tab completes slash commands and `/set` names, and entries are
appended to a history file (default `~/.slm_chat_history`; `--history FILE`,
`--no-history`) that the next session loads (its last `MAX_HISTORY` entries).
The file is only ever appended to, one entry a line, a multi-line entry written
between `\"\"\"` lines as it is typed. A history file that cannot be read or
written (a folder, a FIFO, a full disk) gives one warning on stderr and the
session goes on without it; a new file is made readable by its owner only.
Piped input (scripts, tests) touches no history file.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import sys
from collections.abc import Callable, Sequence

FENCE = '"""'
HISTORY = "~/.slm_chat_history"
MAX_HISTORY = 1000
PROMPT, MORE = ">>> ", "... "


def parse_history(text: str) -> list[str]:
    """The entries of a history file's text (the format `format_entry` writes)."""
    entries, block = [], None
    for line in text.splitlines():
        if line.strip() == FENCE:
            if block is not None:
                entries.append("\n".join(block))
            block = None if block is not None else []
        elif block is not None:
            block.append(line)
        elif line.strip():
            entries.append(line)
    if block:  # a file cut inside a block: keep what is there
        entries.append("\n".join(block))
    return entries


def format_entry(entry: str) -> str:
    """One entry as history-file text: a line, or a multi-line message between
    fence lines."""
    return f"{FENCE}\n{entry}\n{FENCE}\n" if "\n" in entry else entry + "\n"


class LineReader:
    """`read()` returns the next entry (EOFError at the end of input). `first`
    (the CLI's --prompt) comes before the input, shown after the prompt as if
    typed. `words` are what Tab completes: the slash commands, then the names
    `/set` takes."""

    def __init__(
        self,
        out,
        inp: Callable[[str], str] = input,
        first: Sequence[str] = (),
        history: str | None = HISTORY,
        words: Sequence[str] = (),
        names: Sequence[str] = (),
    ):
        self.out, self.inp, self.queued = out, inp, list(first)
        self.words, self.names, self.history, self.last = words, names, None, None
        if inp is input and isinstance(sys.stdin, io.TextIOWrapper):
            # bytes that are not UTF-8 come in as lone surrogates (the REPL refuses
            # them) rather than as a UnicodeDecodeError that would end the session
            sys.stdin.reconfigure(errors="surrogateescape")
        terminal = inp is input and sys.stdin.isatty() and sys.stdout.isatty()
        self.readline = _readline() if terminal else None
        if self.readline:
            self._setup(history)

    def read(self) -> tuple[str, bool]:
        """The next entry, and whether it can only be a message (a `\"\"\"` block
        or a multi-line input: never a command). Ctrl-C inside a block drops it
        (KeyboardInterrupt goes up); end of input inside one sends nothing."""
        if self.queued:
            line = self.queued.pop(0)
            print(f"{PROMPT}{line}", file=self.out)
            return line, "\n" in line
        line, block = self.inp(PROMPT), None
        if line.strip() == FENCE:
            block = []
            while True:
                try:
                    more = self.inp(MORE)
                except EOFError:
                    print(
                        f"\n[unfinished {FENCE} message not sent]",
                        end="",
                        file=self.out,
                    )
                    raise
                if more.strip() == FENCE:
                    break
                block.append(more)
            line = "\n".join(block)
        elif "\n" in line:  # a paste: one message, without the final newline
            line = line.removesuffix("\n").removesuffix("\r")
        self._remember(line)
        return line, block is not None or "\n" in line

    # ------------------------------------------------------ terminal only

    def _setup(self, history: str | None) -> None:
        rl = self.readline
        rl.set_auto_history(False)  # a """ block is one entry, added by _remember
        rl.set_history_length(MAX_HISTORY)
        rl.set_completer(self._complete)
        rl.set_completer_delims(" \t\n")  # "/" is part of a command's name
        if "libedit" in (rl.__doc__ or ""):
            rl.parse_and_bind("bind ^I rl_complete")
        else:
            rl.parse_and_bind("tab: complete")
        if history is None:
            return
        path = os.path.expanduser(history)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would hang a read
                raise OSError(errno.EINVAL, "not a regular file")
            with open(path, encoding="utf-8", errors="replace") as f:
                entries = parse_history(f.read())
        except FileNotFoundError:
            entries = []
        except OSError as exc:
            self._warn(path, "read", exc)
            return
        for entry in entries[-MAX_HISTORY:]:
            rl.add_history(entry)
        self.history, self.last = path, entries[-1] if entries else None

    def _remember(self, entry: str) -> None:
        """Add `entry` to the session's history and append it to the file (an
        empty one, or the same as the last, is left out)."""
        if not self.readline or not entry.strip() or entry == self.last:
            return
        try:
            entry.encode()
        except UnicodeEncodeError:  # not UTF-8: refused by the REPL, not kept
            return
        self.last = entry
        self.readline.add_history(entry)
        if self.history is None:
            return
        try:
            # private, as a shell's history is: it holds the conversations
            fd = os.open(self.history, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with open(fd, "a", encoding="utf-8", errors="replace") as f:
                f.write(format_entry(entry))
        except OSError as exc:
            self._warn(self.history, "write", exc)
            self.history = None  # one warning, then no more tries

    def _warn(self, path: str, what: str, exc: OSError) -> None:
        why = exc.strerror or str(exc)
        print(
            f"warning: cannot {what} the history file {path} ({why}); "
            "this session's input is not saved (--history FILE, --no-history)",
            file=sys.stderr,
            flush=True,
        )

    def _complete(self, text: str, state: int) -> str | None:
        """readline's completer: the command names for the first word of a line
        that starts with "/", the setting names after "/set "."""
        before = self.readline.get_line_buffer()[: self.readline.get_begidx()]
        if not before.strip() and text.startswith("/"):
            pool = self.words
        elif before.split() == ["/set"]:
            pool = self.names
        else:
            return None
        found = [w + " " for w in pool if w.startswith(text)]
        return found[state] if state < len(found) else None


def _readline():
    """The readline module, or None where Python has none (e.g. Windows)."""
    try:
        import readline
    except ImportError:
        return None
    return readline
