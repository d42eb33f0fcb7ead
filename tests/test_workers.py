"""The parallel path of `prepare` (`src.data.workers`, `src.data.documents`): byte ranges of
.txt files cut between documents, workers that read them, and output that matches
a slow document-by-document reference whatever the worker count and range size.
"""

from __future__ import annotations

import json
import math
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from src.corpus import text as C
from src.corpus.records import batched
from src.data import tokens as T
from src.data.documents import QualityFilter, SeenHashes, content_keys, is_val, split_of
from src.data.prepare import prepare_dataset
from src.data.workers import worker_context
from src.tokenizer.spm import Tokenizer


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(f"{d}\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    return path


# ------------------------------------------------------------------ byte ranges


@pytest.mark.parametrize("target", [1, 2, 7, 40])
def test_ranges_cut_only_between_documents(tmp_path, target):
    """Read range by range (as prepare's workers do), a file gives the documents
    of the whole file (no document cut, none lost or repeated), which are those
    of `iter_documents` (checked against a line-by-line reference in
    test_data.py) without the last "" that only carries bytes."""
    rng = random.Random(target)
    pieces = ["a b", "###", " ### ", "", "  ", "c\r", "\ufeffd", "x###", "é ü 😀"]
    pieces += ["\u2028", "\x0c", "###\r", "long line " * 30]
    for i in range(200):
        text = "\n".join(rng.choice(pieces) for _ in range(rng.randrange(30)))
        text = rng.choice(["", "\ufeff"]) + text + rng.choice(["", "\n", "\r\n"])
        path = tmp_path / f"{i}.txt"
        path.write_bytes(text.encode())
        size = path.stat().st_size
        for delimiter in ("###", "blank", "none"):
            ranges = list(C.text_ranges(path, delimiter, target))
            assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]]
            assert ranges[-1][1] == size and all(a < b for a, b in ranges[:-1])
            docs = [
                d for a, b in ranges for d in C.range_documents(path, delimiter, a, b)
            ]
            assert docs == C.range_documents(path, delimiter, 0, size), ranges
            whole = [d for d, _ in C.iter_documents(path, delimiter)]
            if len(whole) == len(docs) + 1 and whole[-1] == "":
                whole.pop()  # bytes after the last document, no document
            assert docs == whole, (delimiter, target, ranges, text)


def test_ranges_skip_long_lines(tmp_path):
    """A line longer than MAX_BREAK_LINE is read in pieces and never taken for a
    break; the cut comes at the blank line after it."""
    path = tmp_path / "c.txt"
    doc = "y" * 10 + "\n" + "x" * (3 * C.MAX_BREAK_LINE)
    path.write_text(f"{doc}\n\n" * 3)
    ranges = list(C.text_ranges(path, "blank", 5))
    assert ranges[0] == (0, len(doc) + 1)
    docs = [d for a, b in ranges for d in C.range_documents(path, "blank", a, b)]
    assert docs == [doc] * 3


# ----------------------------------------------------------- prepare, parallel


def reference_prepare(docs: list[str], tok: Tokenizer, val_fraction: float = 0.1):
    """The slow, obvious pipeline, document by document: filter, drop repeats of
    a text seen before, split by hash, encode; -> ({split: ids}, dropped)."""
    out: dict[str, list[int]] = {"train": [], "val": []}
    dropped = dict.fromkeys(("empty", "too_short", "repetitive", "duplicate"), 0)
    seen, quality = set(), QualityFilter()
    for doc in docs:
        if reason := quality.reason(doc):
            dropped[reason] += 1
            continue
        split, digest = split_of(doc, val_fraction)
        if digest[:8] in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(digest[:8])
        out[split] += tok.encode(doc, eos=True)
    return out, dropped


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("delimiter", ["blank", "<|endoftext|>"])
def test_output_does_not_depend_on_workers_or_ranges(
    tmp_path, stories, tok_dir, delimiter, newline
):
    """Workers read byte ranges of the file themselves: the output is the slow
    reference's, whatever the worker count and range size, with repeats in other
    ranges still dropped and a document longer than a range kept whole."""
    long = "\n".join(stories[:6])  # ~5 KB, no blank line: straddles many ranges
    docs = stories[:30] + ["tiny", "ha ha ha ha ha ha", long] + stories[5:12]
    docs += [long, "ok ok"] + stories[30:50] + stories[:3] + ["\u2581 a ▁ b c d e"]
    if delimiter == "blank":
        text = "\n\n  \n".join(docs) + "\n"
    else:
        docs[40:40] = ["", ""]  # empty documents: two delimiter lines in a row
        text = "".join(f"{d}\n {delimiter}\n" for d in docs)
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(text.replace("\n", newline).encode())
    want, dropped = reference_prepare(docs, Tokenizer.load(tok_dir))
    assert dropped["duplicate"] == 1 + 7 + 3 and dropped["too_short"] >= 2
    for w, range_bytes in ((1, 1 << 20), (1, 300), (2, 300), (3, 300), (2, 1000)):
        out = tmp_path / f"w{w}-{range_bytes}"
        meta = prepare_dataset(
            [corpus], tok_dir, out, delimiter, workers=w, range_bytes=range_bytes
        )
        assert meta["dropped"] == dropped, (w, range_bytes)
        for split in ("train", "val"):
            got = T.open_tokens(out / f"{split}.bin").tolist()
            assert got == want[split], (w, range_bytes, split)


def test_record_batches_come_back_in_order(tmp_path, stories, tok_dir):
    """jsonl rows are read by the parent and shipped in batches; with many small
    batches in flight the output is still the reference's."""
    docs = stories[:70] + ["ha ha ha ha ha ha", "tiny"] + stories[:4]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    want, dropped = reference_prepare(docs, Tokenizer.load(tok_dir))
    for w in (1, 2, 3):
        out = tmp_path / str(w)
        meta = prepare_dataset([corpus], tok_dir, out, workers=w, batch_docs=7)
        assert meta["dropped"] == dropped
        for split in ("train", "val"):
            assert T.open_tokens(out / f"{split}.bin").tolist() == want[split]


def test_limits_with_parallel_workers(tmp_path, stories, tok_dir):
    corpus = write_txt(tmp_path / "c.txt", stories[:70] + stories[:4] + stories[70:])
    for limit in ({"max_docs": 60}, {"max_tokens": 9000}):
        metas = [
            prepare_dataset(
                [corpus],
                tok_dir,
                tmp_path / str(w),
                workers=w,
                range_bytes=500,
                **limit,
            )
            for w in (1, 2, 3)
        ]
        for name in ("train.bin", "val.bin"):
            ref = (tmp_path / "1" / name).read_bytes()
            assert (tmp_path / "2" / name).read_bytes() == ref
            assert (tmp_path / "3" / name).read_bytes() == ref
        assert metas[0]["dropped"] == metas[1]["dropped"] == metas[2]["dropped"]
        splits = metas[0]["splits"].values()
        if "max_docs" in limit:
            assert sum(s["docs"] for s in splits) == 60
        else:
            assert 9000 <= sum(s["n_tokens"] for s in splits) < 9000 + 1000
            # the token limit, not the end of the corpus, stopped it
            assert sum(s["docs"] for s in splits) < len(stories)


def test_workers_start_without_fork_while_threads_run(tmp_path, stories, tok_dir):
    """With another thread running, workers start from a fresh interpreter
    (forkserver) instead of fork: same output."""
    corpus = write_txt(tmp_path / "c.txt", stories[:40])
    ref = prepare_dataset([corpus], tok_dir, tmp_path / "1", workers=1)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert worker_context().get_start_method() != "fork"
        meta = prepare_dataset([corpus], tok_dir, tmp_path / "2", workers=2)
    finally:
        stop.set()
        thread.join()
    assert meta["splits"] == ref["splits"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "2" / name).read_bytes() == (
            tmp_path / "1" / name
        ).read_bytes()


def test_val_split_of_keys_matches_split_of(stories):
    keys = content_keys(stories)
    for fraction in (0.1, 0.5, 0.9):
        want = [split_of(s, fraction)[0] == "val" for s in stories]
        assert is_val(keys, fraction).tolist() == want
        edge = math.ceil(fraction * 2**64)  # exact at the threshold itself
        near = np.array([edge - 1, edge, edge + 1], np.uint64)
        assert is_val(near, fraction).tolist() == [
            k < fraction * 2**64 for k in near.tolist()
        ]


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_byte_in_a_later_range_names_file_and_offset(
    tmp_path, stories, tok_dir, workers
):
    good = "".join(f"{d}\n<|endoftext|>\n" for d in stories[:20]).encode()
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(good + b"bad \xff byte\n<|endoftext|>\n" + good)
    with pytest.raises(
        T.DataError, match=rf"{corpus}: not UTF-8 text \(bad byte at {len(good) + 4}\)"
    ):
        prepare_dataset(
            [corpus], tok_dir, tmp_path / "o", workers=workers, range_bytes=1000
        )
    assert not (tmp_path / "o" / "train.bin").exists()


def test_batches_bounded_by_count_and_size():
    texts = ["a" * 10] * 25 + ["b" * 100] + ["c"] * 3
    sizes = [[len(t) for t in b] for b in batched(texts, 10, max_chars=50)]
    assert sum(map(len, sizes)) == len(texts)
    assert sizes[:5] == [[10] * 5] * 5 and sizes[5] == [100] and sizes[6] == [1] * 3
    assert [len(b) for b in batched(["x"] * 25, 10)] == [10, 10, 5]


def test_seen_hashes_across_merges():
    seen, truth = SeenHashes(merge_every=5), set()
    rng = np.random.default_rng(0)
    for _ in range(40):  # batches with repeats inside and across them
        keys = rng.integers(0, 60, 9).astype(np.uint64) * np.uint64(2**58 + 1)
        where = rng.random(9) < 0.8
        new = seen.add(keys, where)
        for k, w, n in zip(keys.tolist(), where, new, strict=True):
            assert n == (w and k not in truth), (k, w, n)
            if w:
                truth.add(k)
    assert len(seen) == len(truth) and len(seen._sorted) > 0
