"""What every command line of the project shares: how errors end a command,
the argparse value checks, and numbers formatted for people.

`command(parser, argv, body)` is every command's `main`, and `run` the one place
that turns a user's mistake into `error: <message>` and exit status 2 (a
`UserError`, or an OS error on a path the user named), and Ctrl-C into exit status
130, without a traceback. argparse's own usage errors exit 2 as well. No MLX or
torch here: the data and tokenizer commands use it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from .errors import UsageError, UserError

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def program(module: str) -> str:
    """The name a command's usage lines show: the console script it was started
    as (`slm-train`, see pyproject.toml), else `python -m <module>`."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return name if name.startswith("slm-") else f"python -m {module}"


def fail(message: str, prefix: str = "error") -> int:
    """Print `prefix: message` to stderr; the exit status of a user error."""
    print(f"{prefix}: {message}", file=sys.stderr)
    return 2


def command(
    parser: argparse.ArgumentParser,
    argv,
    body: Callable[[argparse.Namespace], int | None],
    *,
    catch: tuple[type[BaseException], ...] = (OSError,),
    prefix: str = "error",
) -> int:
    """A command's `main`: parse `argv` (--help and argparse's usage errors end
    here, 0 or 2), then `run` `body(args)`; its return value (None = 0) is the
    exit status."""
    args = parse(parser, argv)
    if isinstance(args, int):
        return args
    return run(lambda: body(args), catch=catch, prefix=prefix, parser=parser)


def run(
    body: Callable[[], int | None],
    *,
    catch: tuple[type[BaseException], ...] = (OSError,),
    prefix: str = "error",
    parser: argparse.ArgumentParser | None = None,
) -> int:
    """Run a command's body; its return value (None = 0) is the exit status.

    `UserError`s, and the exception types in `catch` (OSError by default: a path
    the user named), print one line and give 2 (a `UsageError` also the usage
    line of `parser`); Ctrl-C gives 130. A name that is not valid UTF-8 (a
    path from argv) is printed with backslash escapes, never a traceback."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # not when a test replaced it
            stream.reconfigure(errors="backslashreplace")
    try:
        return body() or 0
    except UsageError as exc:
        if parser is None:
            return fail(str(exc), prefix)
        parser.print_usage(sys.stderr)
        return fail(str(exc), f"{parser.prog}: error")
    except (UserError, *catch) as exc:
        return fail(str(exc), prefix)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


def parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace | int:
    """`parser.parse_args(argv)`, or the exit status argparse chose (0 after
    --help, 2 after a usage error it has printed) instead of raising SystemExit."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


# ------------------------------------------------------------ argparse types
# Each accepts only finite values in a range that numpy and MLX can hold: no inf,
# nan, or an integer past int64 (they would pass argparse and crash far later).

MAX_INT = 2**63 - 1  # int64: what numpy and MLX take
MAX_NUMBER = 1e9  # e.g. seconds (31 years); more overflows sleep and timeouts


def _int(text: str) -> int | None:
    try:  # int() takes " 5", "+5", "5_000"; over 4300 digits it raises ValueError
        return int(text)
    except ValueError:
        return None


def int_in(lo: int, hi: int, what: str | None = None):
    """A type for integers in [lo, hi]; `what` words them in its message."""
    what = what or f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        value = _int(text)
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = int_in(1, MAX_INT, "a positive integer below 2**63")
positive_int.__doc__ = "An integer in [1, 2**63 - 1]."
count = int_in(0, MAX_INT, "an integer >= 0 and below 2**63")
count.__doc__ = "An integer in [0, 2**63 - 1]."


def positive_number(text: str) -> float:
    """A finite number in (0, 1e9]."""
    return number_in(0.0, MAX_NUMBER, lo_open=True)(text)


def number_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    """A type for numbers in [lo, hi] (finite bounds), each end open where asked;
    nan and inf are never in range."""
    assert math.isfinite(lo) and math.isfinite(hi), "bounds must be finite"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        above = lo < v if lo_open else lo <= v
        below = v < hi if hi_open else v <= hi
        if not (above and below):
            ends = (f"{x:.0f}" if float(x).is_integer() else f"{x:g}" for x in (lo, hi))
            bounds = (
                f"{'(' if lo_open else '['}{', '.join(ends)}{')' if hi_open else ']'}"
            )
            raise argparse.ArgumentTypeError(
                f"expected a number in {bounds}, got {text!r}"
            )
        return v

    return parse


# --------------------------------------------------------------- for people


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (B, KiB, MiB, GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
