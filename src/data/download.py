"""`python -m src.data download`: stream a Hugging Face text dataset (TinyStories by
default) into a local .txt file, one document then a delimiter line each, so the
rest of the pipeline runs offline from it. Needs network and `datasets`."""

from __future__ import annotations

from collections import Counter
from errno import EDQUOT, EFBIG, ENOSPC
from pathlib import Path

from tqdm import tqdm

from ..corpus.sources import DEFAULT_TEXT_FIELD, HubDataset, ReadOptions
from ..corpus.text import DOC_DELIMITER
from ..errors import DataError
from ..files import atomic_file, write_failure


def download_tinystories(
    output: str | Path,
    dataset: str = "roneneldan/TinyStories",
    split: str = "train",
    max_docs: int | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    skipped: Counter | None = None,
) -> int:
    """Stream the `text_field` of a hub dataset's rows into a .txt file with a
    DOC_DELIMITER line after each document; returns the number of documents.
    Rows without text are counted in `skipped` by reason (`SKIP_REASONS`, and
    "empty" for blank text)."""
    n = 0
    skipped = Counter() if skipped is None else skipped
    try:
        opts = ReadOptions(text_field=text_field, skipped=skipped)
        docs = HubDataset(dataset, None, split).documents(opts)
        with atomic_file(output, "w") as f, tqdm(unit=" docs", desc="download") as bar:
            for text, _ in docs:
                if text:
                    f.write(f"{text}\n{DOC_DELIMITER}\n")
                    n += 1
                    bar.update()
                else:
                    skipped["empty"] += 1
                if max_docs is not None and n >= max_docs:
                    break
    except DataError as e:
        # a failure to reach or read the hub (offline shows as ConnectionError,
        # OSError, hub errors...) carries its cause; a bad row does not
        hint = (
            f"\n  offline? copy a TinyStories .txt file (stories separated by "
            f"{DOC_DELIMITER} lines) to {output}, or pass --data PATH"
        )
        raise DataError(
            f"could not download {dataset} (split {split!r}): {e}"
            + (hint if e.__cause__ is not None else "")
        ) from e
    except OSError as e:
        if e.filename is not None or e.errno not in (ENOSPC, EDQUOT, EFBIG):
            raise  # a path: the caller names it
        raise DataError(write_failure(output, e)) from e  # say where, and "disk full"
    if n == 0:
        raise DataError(f"{dataset} (split {split!r}) gave no documents")
    return n
