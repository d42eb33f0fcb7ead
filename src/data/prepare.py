"""Documents -> token files (`prepare`), and `split`/`stats` on existing token
files. No MLX or torch here.

Each document is stripped; empty, too short (fewer than `min_words` words) and
highly repetitive ones (`src.data.documents.repetition`) are dropped and counted,
then exact duplicates (same 64-bit key: the first 8 bytes of the text's sha1; the first
occurrence is kept). A document goes to val when its key falls below
val_fraction * 2**64: the same text always lands on the same side, whatever the
input order. Each document is written whole into its split as [BOS] tokens EOS.
Reading, filtering, hashing and encoding run in worker processes
(`src.data.workers`); each batch comes back, in input order, as a few numpy arrays,
and the parent only picks the new documents and writes them, with numpy
operations per batch rather than Python per document. Memory is bounded by a few
batches in flight plus 8 bytes per unique document for the duplicate check.
Record rows without text in the text field are skipped and counted by reason
(`skipped_rows`; `src.corpus.records`).

The output is committed whole or not at all (`_NewFiles`): train.bin, val.bin
and meta.json are written under temp names beside the old dataset and renamed
over it at the end, meta.json last, so an error, Ctrl-C or SIGTERM leaves the old
dataset as it was and no temp file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..corpus.records import SKIP_REASONS
from ..corpus.sources import (
    DEFAULT_TEXT_FIELD,
    ReadOptions,
    Source,
    open_sources,
)
from ..corpus.text import DOC_DELIMITER
from ..errors import DataError
from ..files import atomic_file, fsync_path, write_failure
from ..tokenizer.kinds import TokenizerLike, load_tokenizer
from ..tokenizer.spm import CHAT_MARKERS
from .documents import (
    REASONS,
    Encoded,
    Job,
    QualityFilter,
    SeenHashes,
    assistant_mask,
    is_val,
)
from .interrupts import held
from .masks import MaskWriter, mask_name
from .tokens import (
    DATASET_META,
    VERSION,
    TokenFileHeader,
    TokenWriter,
    open_tokens,
    read_header,
)
from .workers import RANGE_BYTES, BatchRunner

SPLITS = ("train", "val")
DROP_REASONS = ("empty", "too_short", "repetitive", "duplicate")


def _check_options(val_fraction, max_docs, max_tokens, filt: QualityFilter) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    for name, v in (("--max-docs", max_docs), ("--max-tokens", max_tokens)):
        if v is not None and v < 1:
            raise DataError(f"{name} must be >= 1, got {v}")
    if filt.min_words < 0 or not 0.0 <= filt.max_repetition <= 1.0:
        raise DataError("need --min-words >= 0 and --max-repetition in [0, 1]")


def _check_chat(sources: list[Source], tok: TokenizerLike) -> None:
    """--chat reads conversations from records, in a tokenizer with chat markers."""
    if bad := [source for source in sources if not source.records]:
        raise DataError(
            f"--chat reads conversations from .jsonl/.parquet files or a hub "
            f"dataset, not {bad[0]}"
        )
    if missing := [m for m in CHAT_MARKERS if len(tok.encode(m)) != 1]:
        raise DataError(
            f"{tok.dir}: the tokenizer has no single token for {missing[0]} (train "
            "it with python -m src.tokenizer, which reserves the chat markers)"
        )


class _NewFiles:
    """The new files of a dataset folder, written under temp names beside the old
    ones (`open`: `atomic_file`s) and renamed over them together when the block
    ends without an error, in reverse order of opening, with SIGINT and SIGTERM
    held. Open meta.json first: it is renamed last, so a reader never finds the
    new meta.json beside old token files, and one that finds new token files
    beside the old meta.json (a crash between the renames) is refused by the
    sidecar's token counts. An error or an interrupt deletes every temp file (and
    the folder, if this made it and it is empty): the old dataset stays whole."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files = contextlib.ExitStack()
        self._made = not folder.exists()

    def open(self, name: str, mode: str = "wb"):
        return self._files.enter_context(atomic_file(self.folder / name, mode))

    def __enter__(self) -> _NewFiles:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        failed = exc
        try:
            if exc is None:
                with held():  # an interrupt comes before the renames or after them
                    self._files.close()
                    fsync_path(self.folder)  # the renames survive a crash
            else:
                self._files.__exit__(kind, exc, tb)  # deletes the temp files
        except OSError as e:  # the commit failed, or closing a temp file (disk
            failed = e  # full); atomic_file deleted the temp files either way
        if failed is None:
            return
        if self._made:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty
        if isinstance(failed, OSError) and (failed is not exc or self._wrote(failed)):
            raise DataError(write_failure(self.folder, failed)) from failed
        if failed is not exc:
            raise failed

    def _wrote(self, exc: OSError) -> bool:
        """Whether an error in the block came from writing the new files (a full
        disk, a file in this folder) rather than from reading an input."""
        if exc.filename is None:
            return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        return Path(exc.filename).parent == self.folder


def _taken(new, lengths, kept: int, written: int, max_docs, max_tokens) -> int:
    """How many documents of a batch to take: document i is taken while fewer than
    max_docs documents are kept and fewer than max_tokens tokens written before it
    (new: the mask of the batch's documents to keep, lengths: their tokens)."""
    stop = np.zeros(len(new), bool)
    if max_docs is not None:
        stop |= kept + np.cumsum(new) - new >= max_docs
    if max_tokens is not None:
        size = np.where(new, lengths, 0)
        stop |= written + np.cumsum(size) - size >= max_tokens
    return int(np.argmax(stop)) if stop.any() else len(new)


def _count(enc: Encoded, new: np.ndarray, n: int, dropped: dict) -> None:
    """Add the drop reasons of the first n documents of a batch to `dropped`."""
    reasons = enc.reasons[:n]
    counts = np.bincount(reasons, minlength=len(REASONS) + 1)
    for i, reason in enumerate(REASONS, 1):
        dropped[reason] += int(counts[i])
    dropped["duplicate"] += int(np.count_nonzero((reasons == 0) & ~new[:n]))


def _route(enc: Encoded, new: np.ndarray, n: int, val_fraction: float) -> dict:
    """{split: (documents, tokens)} of the new documents among the first n of a
    batch, in order."""
    take = new.copy()
    take[n:] = False
    val = is_val(enc.keys, val_fraction)
    encoded = enc.reasons == 0  # the documents whose tokens are in enc.tokens
    out = {}
    for split, mask in (("train", take & ~val), ("val", take & val)):
        per_token = np.repeat(mask[encoded], enc.lengths[encoded])
        out[split] = int(np.count_nonzero(mask)), enc.tokens[per_token]
    return out


def prepare_dataset(
    source: Iterable[str | Path | Source],
    tokenizer: str | Path,
    output: str | Path,
    delimiter: str = DOC_DELIMITER,
    val_fraction: float = 0.1,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    quality: QualityFilter | None = None,
    bos: bool = False,
    workers: int | None = None,
    batch_docs: int = 512,
    range_bytes: int = RANGE_BYTES,
    chat: bool = False,
) -> dict:
    """Sources (paths, folders, globs or `src.corpus.sources.Source`s, such as a
    hub dataset) -> output/{train,val}.bin and meta.json; returns the meta.

    Stops after `max_docs` kept documents or once `max_tokens` tokens are written
    (whole documents: the last one may cross the limit). `workers` processes
    read, filter and encode (default: one per core); the output does not depend
    on it. A task is `range_bytes` of a .txt file (whole documents: more when one
    is longer) or `batch_docs` texts of other sources. With `chat`, each record's
    `text_field` is a conversation, rendered in the chat template, and meta.json
    says `"chat_template": true` (the trainer copies it into its checkpoints, so
    the REPL speaks to the model in that template), and each split gets an
    assistant mask, {split}.mask.bin (`src.data.tokens`; which tokens:
    `src.data.documents.assistant_mask`), named in meta.json as its `mask_file`.
    """
    quality = quality or QualityFilter()
    _check_options(val_fraction, max_docs, max_tokens, quality)
    read = ReadOptions(delimiter, text_field, chat)
    tok = load_tokenizer(tokenizer)
    sources = open_sources(source)
    if chat:
        _check_chat(sources, tok)
    workers = workers or os.cpu_count() or 1
    seen = SeenHashes()
    docs = dict.fromkeys(SPLITS, 0)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    written, start = 0, time.perf_counter()
    if bos and tok.bos_id is None:
        raise DataError(f"--bos: the tokenizer {tok.dir} has no BOS token")
    job = Job(str(tok.file), quality, bos)  # what the workers load
    tasks = (t for src in sources for t in src.tasks(read, batch_docs, range_bytes))
    with BatchRunner(job, workers) as runner, _NewFiles(Path(output)) as new:
        meta_file = new.open(DATASET_META, "w")  # opened first: committed last
        writers = {
            s: TokenWriter(new.open(f"{s}.bin"), tok.vocab_size, tok.sha256)
            for s in SPLITS
        }
        masks, marker = {}, None
        if chat:  # which tokens are the assistant's: the chat loss counts those
            masks = {s: MaskWriter(new.open(mask_name(f"{s}.bin"))) for s in SPLITS}
            closers = tuple(i for i in (tok.eos_id, tok.bos_id) if i is not None)
            marker = (tok.encode("<|assistant|>")[0], tok.encode("<|end|>")[0], closers)
        bar = tqdm(unit=" docs", desc="prepare")
        results = runner.map(tasks)
        with bar, contextlib.closing(results):
            for enc in results:
                fresh = seen.add(enc.keys, enc.reasons == 0)
                kept = sum(docs.values())
                n = _taken(fresh, enc.lengths, kept, written, max_docs, max_tokens)
                _count(enc, fresh, n, dropped)
                for s, (n_docs, tokens) in _route(enc, fresh, n, val_fraction).items():
                    docs[s] += n_docs
                    if tokens.size:
                        writers[s].write(tokens)
                        if masks:  # whole documents: each chunk starts outside a reply
                            masks[s].write(assistant_mask(tokens, *marker))
                        written += tokens.size
                bar.update(n)
                rate = written / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{written:,} tokens, {rate:,.0f} tokens/s", False)
                if n < len(fresh):  # a limit is reached
                    break
        skipped = {r: read.skipped[r] for r in SKIP_REASONS}
        for s, name in (("train", "training"), ("val", "validation")):
            if docs[s] == 0:
                rows = f", rows without text {skipped}" if any(skipped.values()) else ""
                raise DataError(
                    f"the {name} split is empty ({sum(docs.values())} documents "
                    f"kept, dropped {dropped}{rows}, val fraction {val_fraction}): "
                    "use more text, or check --delimiter, --text-field and the "
                    "filters"
                )
        headers = {s: w.finish() for s, w in writers.items()}
        for w in masks.values():
            w.finish()
        meta = {
            "format_version": VERSION,
            "tokenizer": {
                "dir": str(tok.dir),
                "kind": tok.kind,
                "sha256": tok.sha256,
                "bos_id": tok.bos_id,
                "eos_id": tok.eos_id,
                "vocab_size": tok.vocab_size,
            },
            "inputs": [src.describe() for src in sources],
            "delimiter": delimiter,
            "text_field": text_field,
            "chat_template": chat,
            "val_fraction": val_fraction,
            "max_docs": max_docs,
            "max_tokens": max_tokens,
            "filters": asdict(quality),
            "bos": bos,
            "workers": workers,
            "eos": True,
            "dropped": dropped,
            "duplicates_dropped": dropped["duplicate"],
            # rows of .jsonl/.parquet files and hub datasets without text in
            # text_field, by reason (src.corpus.records)
            "skipped_rows": skipped,
            "splits": {
                s: {"file": f"{s}.bin", "docs": docs[s], **asdict(headers[s])}
                for s in SPLITS
            },
        }
        for s, w in masks.items():  # the loader opens the mask meta.json names
            meta["splits"][s].update(mask_file=mask_name(f"{s}.bin"),
                                     assistant_tokens=w.counted)  # fmt: skip
        json.dump(meta, meta_file, indent=2)
    return meta


# ------------------------------------------------------ existing token files


def _eos_cut(tokens: np.ndarray, index: int, eos_id: int, chunk: int = 1 << 20):
    """The first position >= index just after an EOS (a document boundary), or
    None when there is none before the end of the file."""
    if index == 0 or tokens[index - 1] == eos_id:
        return index
    for lo in range(index, len(tokens), chunk):
        hits = np.flatnonzero(tokens[lo : lo + chunk] == eos_id)
        if hits.size:
            return lo + int(hits[0]) + 1
    return None


def split_token_file(
    path: str | Path,
    output: str | Path,
    val_fraction: float | None = None,
    val_tokens: int | None = None,
    eos_id: int | None = 3,
) -> dict:
    """Split a token file by index: the first part -> output/train.bin, the rest
    -> output/val.bin, plus meta.json. The cut is at n - val_tokens (or
    n * (1 - val_fraction)), moved forward to just after the next `eos_id` so no
    document straddles the two files (eos_id None: cut exactly there)."""
    path, out = Path(path), Path(output)
    h = read_header(path)
    if out.resolve() == path.parent.resolve() and path.name in ("train.bin", "val.bin"):
        raise DataError(f"{path}: would be overwritten; choose another --output")
    tokens = open_tokens(path)
    n = h.n_tokens
    if (val_fraction is None) == (val_tokens is None):
        raise DataError("give exactly one of --val-fraction and --val-tokens")
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    want = val_tokens if val_tokens is not None else round(n * val_fraction)
    if not 0 < want < n:
        raise DataError(f"{path}: cannot take {want} of its {n} tokens for val")
    cut = n - want if eos_id is None else _eos_cut(tokens, n - want, eos_id)
    if cut is None or cut >= n:
        raise DataError(
            f"{path}: no document boundary (EOS id {eos_id}) after token {n - want};"
            " pass a larger --val-tokens/--val-fraction or --exact"
        )
    tokenizer = _source_tokenizer(path, h)
    sha = (tokenizer or {}).get("sha256")
    headers = {}
    with _NewFiles(out) as new:
        meta_file = new.open(DATASET_META, "w")  # opened first: committed last
        for s, (lo, hi) in zip(SPLITS, ((0, cut), (cut, n)), strict=True):
            w = TokenWriter(new.open(f"{s}.bin"), h.vocab_size, sha)
            for a in range(lo, hi, 1 << 22):  # bounded memory
                w.write(tokens[a : min(hi, a + (1 << 22))])
            headers[s] = w.finish()
        meta = {"format_version": VERSION, "split_of": str(path), "cut": cut}
        if tokenizer:
            meta["tokenizer"] = tokenizer
        meta["splits"] = {s: {"file": f"{s}.bin", **asdict(headers[s])} for s in SPLITS}
        json.dump(meta, meta_file, indent=2)
    return meta


def _source_tokenizer(path: Path, h: TokenFileHeader) -> dict | None:
    """The tokenizer a token file was made with, to carry over to its splits: the
    `tokenizer` entry of the meta.json beside it when that agrees with the header
    (a version 1 header names none), else what the header names."""
    side = path.parent / DATASET_META
    found = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        found = json.loads(side.read_text(encoding="utf-8"))["tokenizer"]
    sha = found.get("sha256") if isinstance(found, dict) else None
    if not (isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha)):
        found = None
    if h.tokenizer_sha256 and (found is None or sha != h.tokenizer_sha256):
        return {"sha256": h.tokenizer_sha256}
    return found


def token_stats(path: str | Path, eos_id: int | None = 3) -> dict:
    """Header fields, documents (EOS count) and mean document length of a file."""
    path = Path(path)
    h = read_header(path)
    tokens = open_tokens(path)
    n_eos, top = 0, -1
    for a in range(0, h.n_tokens, 1 << 22):
        chunk = np.asarray(tokens[a : a + (1 << 22)])
        top = max(top, int(chunk.max()))
        if eos_id is not None:
            n_eos += int(np.count_nonzero(chunk == eos_id))
    return {
        "file": str(path),
        **asdict(h),
        "bytes": path.stat().st_size,
        "max_id": top,
        "docs": n_eos,
        "mean_doc_tokens": h.n_tokens / n_eos if n_eos else None,
    }
