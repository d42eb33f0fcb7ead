"""Rows with fields: .jsonl/.json and .parquet files and Hugging Face hub datasets,
all streamed by `datasets` (the same code path, so tests exercise the hub's
offline), and the text of one field of each row. No MLX or torch here.

`datasets` is imported only when rows are read: it is slow to import, and the
plain-text path never needs it. Its errors become `DataError`s naming the file or
dataset. A row without text in the field (no such field, null, or not a string) is
skipped and counted by reason; a file or dataset none of whose rows has text is
a `DataError` naming it, the field and the fields its rows do have.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from ..errors import DataError
from ..template import CHAT, render_conversation


def datasets_module():
    """The `datasets` package, or a DataError saying how to install it."""
    try:
        import datasets  # heavy: imported only when a record source is read
    except ImportError:
        raise DataError(
            "reading .jsonl/.parquet files or hub datasets needs the `datasets` "
            "package (pip install datasets)"
        ) from None
    return datasets


def stream(where: str, load: Callable[[], Iterable[dict]]) -> Iterator[dict]:
    """Rows of a `datasets` stream; its errors (bad JSON, a damaged parquet file,
    no network) become DataError naming `where`."""
    # datasets logs such errors with a traceback before raising: we say it once.
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield from load()
    except DataError:
        raise
    except Exception as e:  # pyarrow, fsspec, hub and network errors alike
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{where}: cannot read it: {type(e).__name__}: {msg}") from e
    finally:
        log.setLevel(level)


# Why a row gives no text: its rows have no such field; this row has no value
# there (null, or the key absent from this row while other rows have it:
# `datasets` reads both as None); the value is not a string.
SKIP_REASONS = ("no_field", "null", "not_text")


def skipped_summary(counts: dict, text_field: str) -> str | None:
    """The line that reports record rows skipped for having no text (and, where
    counted, blank texts), or None when none was."""
    got = ", ".join(
        f"{counts[why]} {why}" for why in (*SKIP_REASONS, "empty") if counts.get(why)
    )
    return f"rows skipped (no text in field {text_field!r}): {got}" if got else None


def iter_records(
    rows: Iterable[dict],
    where: str,
    text_field: str,
    chat: bool = False,
    skipped: Counter | None = None,
) -> Iterator[tuple[str, int]]:
    """(stripped text, 0) of each row's `text_field`. A row without text there
    (no such field, no value, or a value that is not text) is skipped and
    counted in `skipped` by reason (SKIP_REASONS); rows none of which has text
    are a DataError naming `where`, the field and the fields the rows have. With
    `chat`, the field holds a conversation (a list of {"role", "content"}
    messages), rendered as one text in the chat template (`src.template.CHAT`);
    a malformed one is a DataError naming its row."""
    counts: Counter = Counter()
    first = None  # (row number, reason, row) of the first row skipped
    used = 0
    for i, row in enumerate(rows):
        text = row.get(text_field)
        if text_field not in row:
            reason = "no_field"
        elif text is None:
            reason = "null"
        else:
            if chat:
                try:
                    text = render_conversation(text, CHAT)
                except ValueError as e:
                    raise DataError(
                        f"{where}: row {i} field {text_field!r}: {e}"
                    ) from None
            if isinstance(text, str):
                used += 1
                yield text.strip(), 0
                continue
            reason = "not_text"
        counts[reason] += 1
        if skipped is not None:
            skipped[reason] += 1
        if first is None:
            first = (i, reason, row)
    if counts and not used:
        raise DataError(_no_text(where, text_field, counts, *first))


def _no_text(where: str, field: str, counts: Counter, i: int, reason: str, row):
    """The message for rows none of which has text in `field`."""
    fields = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
    if reason == "no_field":
        example = f"row {i} has no field {field!r} (fields: {fields})"
    elif reason == "null":
        example = f"row {i} field {field!r} is null (fields with values: {fields})"
    else:
        value = row[field]
        hint = " (a conversation? use --chat)" if isinstance(value, list) else ""
        example = f"row {i} field {field!r} is a {type(value).__name__}, not text{hint}"
    got = ", ".join(f"{counts[r]} {r}" for r in SKIP_REASONS if counts[r])
    return (
        f"{where}: no row has text in field {field!r} ({got}): {example}; "
        "choose the field with --text-field"
    )


def batched(texts: Iterable[str], n: int, max_chars: int = 1 << 22) -> Iterator[list]:
    """Lists of up to n texts and about max_chars characters (a longer text is a
    batch of its own), so huge documents do not multiply the memory in flight."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= n or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
