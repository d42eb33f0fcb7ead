"""Rows with fields: .jsonl/.json and .parquet files and Hugging Face hub datasets,
all streamed by `datasets` (the same code path, so tests exercise the hub's
offline), and the text of one field of each row. No MLX or torch here.

`datasets` is imported only when rows are read: it is slow to import, and the
plain-text path never needs it. Its errors become `DataError`s naming the file or
dataset, and a row without the field, or with a non-text one, names its row.
"""

from __future__ import annotations

import logging
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


def iter_records(
    rows: Iterable[dict], where: str, text_field: str, chat: bool = False
) -> Iterator[tuple[str, int]]:
    """(stripped text, 0) of each row's `text_field`; DataError naming `where`
    when the field is missing or not a string. With `chat`, the field holds a
    conversation (a list of {"role", "content"} messages), rendered as one text
    in the chat template (`src.template.CHAT`)."""
    for i, row in enumerate(rows):
        if text_field not in row:
            raise DataError(
                f"{where}: row {i} has no field {text_field!r} (fields: "
                f"{', '.join(sorted(row))}); choose one with --text-field"
            )
        text = row[text_field]
        if text is None:
            continue
        if chat:
            try:
                text = render_conversation(text, CHAT)
            except ValueError as e:
                raise DataError(f"{where}: row {i} field {text_field!r}: {e}") from None
        if not isinstance(text, str):
            hint = " (a conversation? use --chat)" if isinstance(text, list) else ""
            raise DataError(
                f"{where}: row {i} field {text_field!r} is a {type(text).__name__},"
                f" not text{hint}"
            )
        yield text.strip(), 0


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
