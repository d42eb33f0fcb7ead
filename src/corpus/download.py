"""`python -m src.data download`: stream a Hugging Face text dataset (TinyStories by
default) into a local .txt file, one document then a delimiter line each, so the
rest of the pipeline runs offline from it. Needs network and `datasets`."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ..errors import DataError
from ..files import atomic_file
from .sources import DOC_DELIMITER


def download_tinystories(
    output: str | Path,
    dataset: str = "roneneldan/TinyStories",
    split: str = "train",
    max_docs: int | None = None,
) -> int:
    """Stream a Hugging Face text dataset into a .txt file with a DOC_DELIMITER line
    after each document; returns the number of documents."""
    try:
        import datasets  # heavy, and only needed here
    except ImportError:
        raise DataError(
            "download needs the `datasets` package (pip install datasets)"
        ) from None
    n = 0
    try:
        rows = datasets.load_dataset(dataset, split=split, streaming=True)
        with atomic_file(output, "w") as f, tqdm(unit=" docs", desc="download") as bar:
            for row in rows:
                if "text" not in row:
                    raise DataError(
                        f"{dataset}: rows have no 'text' field ({sorted(row)})"
                    )
                if text := row["text"].strip():
                    f.write(f"{text}\n{DOC_DELIMITER}\n")
                    n += 1
                    bar.update()
                if max_docs is not None and n >= max_docs:
                    break
    except DataError:
        raise
    except Exception as e:  # offline shows as ConnectionError, OSError, hub errors...
        raise DataError(
            f"could not download {dataset} (split {split!r}): {type(e).__name__}: {e}\n"
            f"  offline? copy a TinyStories .txt file (stories separated by "
            f"{DOC_DELIMITER} lines) to {output}, or pass --data PATH"
        ) from e
    if n == 0:
        raise DataError(f"{dataset} (split {split!r}) gave no documents")
    return n
