"""Measure the data pipeline (issue 3's speed section) on the shared corpora.

    python scripts/bench_data.py [--shared ../shared/data] [--skip-vocab]

1. encoding throughput of `prepare` with one worker vs one per core, same input,
   same run (the outputs must be byte-identical);
2. peak memory of `prepare` on the Gutenberg folder and on 10x that input (ten
   copies, each document made distinct), which must be about the same;
3. tokenizer training time and bytes/token for vocab 4k, 8k, 16k, 32k on the
   TinyStories sample (bytes/token measured on tinystories_valid.txt).
Each `prepare` runs as a child process, so its peak RSS is ru_maxrss of that child.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "src").is_dir():  # run from outside the repo: use the cwd
    ROOT = Path.cwd()


def run(*argv: str) -> tuple[float, float]:
    """(seconds, peak RSS MiB of the process tree's largest child) of a command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.perf_counter() - t, max(peak, before) / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--skip-vocab", action="store_true")
    args = p.parse_args(argv)
    shared = Path(args.shared)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = tmp / "tok"
        run(
            "-m",
            "src.tokenizer",
            "train",
            "--input",
            str(shared / "tinystories_train.txt"),
            "--output",
            str(tok),
            "--vocab-size",
            "4096",
        )
        gut = str(shared / "gutenberg")
        prep = [
            "-m",
            "src.data",
            "prepare",
            "--tokenizer",
            str(tok),
            "--delimiter",
            "blank",
        ]
        times = {}
        for w in (1, cores):
            out = tmp / f"w{w}"
            times[w], _ = run(
                *prep, "--input", gut, "--output", str(out), "--workers", str(w)
            )
        same = all(
            (tmp / "w1" / f).read_bytes() == (tmp / f"w{cores}" / f).read_bytes()
            for f in ("train.bin", "val.bin")
        )
        n = json.loads((tmp / "w1" / "meta.json").read_text())
        tokens = sum(s["n_tokens"] for s in n["splits"].values())
        print(
            f"encode: {tokens:,} tokens; 1 worker {times[1]:.1f} s "
            f"({tokens / times[1]:,.0f} tok/s), {cores} workers {times[cores]:.1f} s "
            f"({tokens / times[cores]:,.0f} tok/s): x{times[1] / times[cores]:.2f}; "
            f"identical output: {same}"
        )
        big = tmp / "gutenberg10"
        big.mkdir()
        for k in range(10):
            for f in sorted(Path(gut).glob("*.txt")):
                text = f.read_text(encoding="utf-8")
                paras = text.split("\n\n")
                (big / f"{k}-{f.name}").write_text(
                    "\n\n".join(f"{para} [{k}]" for para in paras), encoding="utf-8"
                )
        # Peak RSS in fresh children (RUSAGE_CHILDREN is a running max: run 1x last
        # would hide behind 10x, so measure each in its own interpreter).
        for name, src in (("1x", gut), ("10x", str(big))):
            code = (
                f"import resource, subprocess, sys; subprocess.run([sys.executable, "
                f"{json.dumps(prep + ['--input', src, '--output', str(tmp / name)])[1:-1]}],"
                f" check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
                f"print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
            )
            t = time.perf_counter()
            kb = int(
                subprocess.run(
                    [sys.executable, "-c", code],
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            print(
                f"prepare {name}: {time.perf_counter() - t:.1f} s, "
                f"peak RSS {kb / 1024:.0f} MiB (largest process)"
            )
        if args.skip_vocab:
            return 0
        valid = str(shared / "tinystories_valid.txt")
        for vocab in (4096, 8192, 16384, 32000):
            d = tmp / f"v{vocab}"
            try:
                secs, _ = run(
                    "-m",
                    "src.tokenizer",
                    "train",
                    "--input",
                    str(shared / "tinystories_train.txt"),
                    "--output",
                    str(d),
                    "--vocab-size",
                    str(vocab),
                )
            except subprocess.CalledProcessError:
                print(f"vocab {vocab}: too large for this corpus")
                continue
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "src.tokenizer",
                    "stats",
                    "--tokenizer",
                    str(d),
                    "--input",
                    valid,
                ],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.splitlines()[-1]
            print(
                f"vocab {vocab}: trained in {secs:.1f} s; valid {out.split(': ', 1)[1]}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
