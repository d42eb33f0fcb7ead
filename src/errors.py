"""The mistakes a user can make, one class per kind, all `UserError`s.

Every command prints a `UserError` as one line, `error: <message>`, and exits with
status 2 (`src.cli.run`); anything else is a bug and keeps its traceback. A message
names what is wrong (the file, key or value) and, where there is one, the fix.
The second base of each class is what callers caught before this module existed
(`ValueError`, `RuntimeError`), so `except ValueError` still sees them.
`utf8_problem` says why text that came in (argv, stdin, a file name) is not
valid UTF-8. No imports: every module may import this one.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, files or setup (not a bug of ours)."""


class UsageError(UserError):
    """A wrong combination of command-line options (reported with the usage line,
    as argparse reports its own)."""


class ConfigError(UserError, ValueError):
    """A config file or `--set` override: names the key, the value and the rule."""


class DataError(UserError, ValueError):
    """A corpus or token file that is missing, damaged or unusable: names the file."""


class TokenizerError(UserError, ValueError):
    """A missing or unusable tokenizer, or a bad request when training one."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or cannot be written."""


class ConvertError(UserError, ValueError):
    """A model that cannot be exported or imported exactly."""


class PlotError(UserError, ValueError):
    """A missing or unreadable log folder."""


class DistributedError(UserError, RuntimeError):
    """Data-parallel ranks that cannot form one consistent job."""


def utf8_problem(text: str) -> str | None:
    """Why `text` cannot be written as UTF-8, or None when it can. Python keeps an
    invalid byte of argv, stdin or a file name as a lone surrogate (0xff becomes
    "\\udcff"), which every encoder, tokenizer and file write later rejects."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = (
            f"byte 0x{code - 0xDC00:02x}"
            if 0xDC80 <= code <= 0xDCFF
            else f"lone surrogate U+{code:04X}"
        )
        return f"not valid UTF-8 ({what} at character {exc.start})"
    return None
