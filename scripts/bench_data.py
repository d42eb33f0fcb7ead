"""Measure the data pipeline (issue 3's speed section) on the shared corpora.

    python scripts/bench_data.py [--shared ../shared/data] [--repeats 3]
                                 [--skip-large] [--skip-vocab]

1. encoding throughput of `prepare` with one worker vs one per core, on the same
   input in the same run: runs interleaved (1, N, 1, N, ...), the median of
   --repeats each, on the Gutenberg folder (--delimiter blank) and on 10x that
   input (ten copies, each document made distinct). Two ratios: of the tokens/s
   `prepare` reports (its own clock, from opening the tokenizer to the last file
   written), and of the whole command's wall time (plus ~0.3 s of interpreter
   start-up and imports, the same for both). The line says whether the two
   outputs are byte-identical;
2. peak memory of `prepare` on the Gutenberg folder and on the 10x input, which
   must be about the same;
3. tokenizer training time and bytes/token for vocab 4k, 8k, 16k, 32k on the
   TinyStories sample (bytes/token measured on tinystories_valid.txt).
Each command runs as a child process, so its peak RSS is ru_maxrss of that child.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "src").is_dir():  # run from outside the repo: use the cwd
    ROOT = Path.cwd()


def run(*argv: str) -> tuple[float, str]:
    """(seconds, stdout) of `python argv...` in the repo."""
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return time.perf_counter() - t, out


def train_tokenizer(corpus: Path, out: Path, vocab: int) -> float:
    argv = ["--input", str(corpus), "--output", str(out), "--vocab-size", str(vocab)]
    return run("-m", "src.tokenizer", "train", *argv)[0]


def encode_speed(name, prep: list[str], src: Path, tmp: Path, cores, repeats):
    """Print the 1-worker vs all-cores line for one input."""
    wall: dict[int, list[float]] = {1: [], cores: []}
    inside: dict[int, list[float]] = {1: [], cores: []}
    for _ in range(repeats):
        for w in (1, cores):
            out = tmp / f"{name}-w{w}"
            secs, stdout = run(
                *prep, "--input", str(src), "--output", str(out), "--workers", str(w)
            )
            wall[w].append(secs)
            inside[w].append(float(re.search(r"tokens in ([\d.]+) s", stdout)[1]))
    same = all(
        (tmp / f"{name}-w1" / f).read_bytes()
        == (tmp / f"{name}-w{cores}" / f).read_bytes()
        for f in ("train.bin", "val.bin")
    )
    meta = json.loads((tmp / f"{name}-w1" / "meta.json").read_text())
    tokens = sum(s["n_tokens"] for s in meta["splits"].values())
    i1, i_n = (statistics.median(inside[w]) for w in (1, cores))
    w1, w_n = (statistics.median(wall[w]) for w in (1, cores))
    print(
        f"encode {name}: {tokens:,} tokens, median of {repeats}; 1 worker "
        f"{tokens / i1:,.0f} tok/s, {cores} workers {tokens / i_n:,.0f} tok/s: "
        f"x{i1 / i_n:.2f}; whole command {w1:.2f} s vs {w_n:.2f} s: "
        f"x{w1 / w_n:.2f}; identical output: {same}"
    )


def replicate(src: Path, dest: Path, copies: int = 10) -> Path:
    """`copies` copies of a folder of blank-line-separated .txt files, each
    paragraph tagged with its copy number so no document repeats another."""
    dest.mkdir()
    for k in range(copies):
        for f in sorted(src.glob("*.txt")):
            paras = f.read_text(encoding="utf-8").split("\n\n")
            (dest / f"{k}-{f.name}").write_text(
                "\n\n".join(f"{para} [{k}]" for para in paras), encoding="utf-8"
            )
    return dest


def peak_rss_mib(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB of the largest process) of `python argv...`, in a
    fresh interpreter: RUSAGE_CHILDREN is a running maximum over all children."""
    code = (
        "import resource, subprocess, sys; subprocess.run([sys.executable, "
        f"*{argv!r}], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    secs, out = run("-c", code)
    return secs, int(out) / 1024


def vocab_table(shared: Path, tmp: Path) -> None:
    valid = str(shared / "tinystories_valid.txt")
    for vocab in (4096, 8192, 16384, 32000):
        d = tmp / f"v{vocab}"
        try:
            secs = train_tokenizer(shared / "tinystories_train.txt", d, vocab)
        except subprocess.CalledProcessError:
            print(f"vocab {vocab}: too large for this corpus")
            continue
        argv = ["stats", "--tokenizer", str(d), "--input", valid]
        out = run("-m", "src.tokenizer", *argv)[1].splitlines()[-1]
        print(f"vocab {vocab}: trained in {secs:.1f} s; valid {out.split(': ', 1)[1]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--repeats", type=int, default=3, help="runs per worker count")
    p.add_argument("--skip-large", action="store_true", help="no 10x speed line")
    p.add_argument("--skip-vocab", action="store_true")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    shared = Path(args.shared)
    cores = os.cpu_count() or 1
    if cores == 1:
        print("one core: no all-cores vs one-process comparison to make")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tmp / "tok"
        train_tokenizer(shared / "tinystories_train.txt", tok, 4096)
        prep = ["-m", "src.data", "prepare", "--tokenizer", str(tok)]
        prep += ["--delimiter", "blank"]
        gut = shared / "gutenberg"
        big = replicate(gut, tmp / "gutenberg10")
        if cores > 1:
            encode_speed("gutenberg", prep, gut, tmp, cores, args.repeats)
            if not args.skip_large:
                encode_speed("gutenberg-x10", prep, big, tmp, cores, args.repeats)
        for name, src in (("1x", gut), ("10x", big)):
            out = tmp / f"rss-{name}"
            secs, mib = peak_rss_mib([*prep, "--input", str(src), "--output", str(out)])
            print(
                f"prepare {name}: {secs:.1f} s, peak RSS {mib:.0f} MiB (largest process)"
            )
        if not args.skip_vocab:
            vocab_table(shared, tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
