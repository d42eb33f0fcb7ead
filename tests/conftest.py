"""Shared fixtures: tiny configs, a corpus, a tokenizer, token files, a trainer.
Training runs here do not measure their execution policy (SLM_AUTOTUNE=off).

Importing `src` first loads the optimized BLAS before any test module imports
mlx.core (see src/backend/blas.py).

The corpus is real TinyStories text from ../shared/data when it is there, else a
synthetic one of the same form (stories separated by `<|endoftext|>` lines, made
here from a fixed seed), so the suite runs, rather than skips, without it.
"""

import os
import random
import signal
import warnings
from pathlib import Path

import pytest

import src  # noqa: F401  (must precede every mlx import)

# pytest-xdist's workers (scripts/test.sh) ignore SIGINT, and a child inherits an
# ignored signal: the commands the tests Ctrl-C would never see it. Restore it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Runs in tests keep the default execution policy instead of measuring one at
# start (and never write ~/.cache); tests/test_autotune.py turns it back on.
os.environ["SLM_AUTOTUNE"] = "off"

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DELIMITER = "<|endoftext|>"

# The tiny model most tests build; a test overrides what it needs.
TINY_MODEL = dict(
    vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, context_length=24
)


@pytest.fixture(scope="session")
def tiny_config():
    """A factory of validated tiny Configs: `tiny_config(context_length=32,
    training={"batch_size": 4})` is TINY_MODEL with those changes."""
    from src.config import config_from_dict

    def make(training: dict | None = None, **model):
        return config_from_dict({"model": {**TINY_MODEL, **model},
                                 "training": training or {}})  # fmt: skip

    return make


# ------------------------------------------------------------------- corpus

_SYLLABLES = ("ba be bi bo bu da de di do du ka ke ki ko ku la le li lo lu ma me mi "
              "mo mu na ne ni no nu pa pe pi po pu ra re ri ro ru sa se si so su ta "
              "te ti to tu va ve vi vo wa we wi yo zu").split()  # fmt: skip
_ANIMALS = "dog cat bird bunny frog duck bear fox mouse owl lion pig cow horse".split()
_THINGS = ("ball kite box hat car apple book cake flower stick stone shell boat drum "
           "cup spoon bell star leaf feather").split()  # fmt: skip
_PLACES = "park garden forest beach house farm river hill town school".split()
_ADJECTIVES = (
    "big little happy shiny soft sad funny kind red blue green old tiny".split()
)
_FEELINGS = "happy sad scared excited tired proud angry calm".split()


def _synthetic_story(rng: random.Random) -> str:
    def name() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))

    hero, friend = name().title(), name().title()
    animal, thing = rng.choice(_ANIMALS), rng.choice(_THINGS)
    place, feel = rng.choice(_PLACES), rng.choice(_FEELINGS)
    adj, adj2 = rng.choice(_ADJECTIVES), rng.choice(_ADJECTIVES)
    lines = [
        f"Once upon a time, there was a {adj} {animal} named {hero}.",
        f"{hero} lived near the {place} with a friend called {friend}.",
        f"One day, {hero} found a {adj2} {thing} in the {place}.",
        f'"Look, {friend}! I found a {thing}," said {hero}.',
        f'{friend} was {feel} and said, "Let us play with it."',
        f"They played with the {thing} for {rng.randint(2, 9)} hours.",
        f"At night, {hero} said thank you to {friend} and went home.",
    ]
    kept = [lines[0]] + [line for line in lines[1:] if rng.random() < 0.8]
    if rng.random() < 0.5:
        kept.append(f"The {name()} of the {place} was {rng.choice(_ADJECTIVES)}.")
    return (" " if rng.random() < 0.7 else "\n").join(kept)


def synthetic_stories(n_bytes: int, seed: int = 0) -> list[str]:
    """TinyStories-like stories (invented names give a large vocabulary), about
    n_bytes in all."""
    rng = random.Random(seed)
    stories, size = [], 0
    while size < n_bytes:
        stories.append(_synthetic_story(rng))
        size += len(stories[-1].encode()) + len(DELIMITER) + 2
    return stories


def story_text(n_chars: int) -> tuple[str, str]:
    """(text of whole stories, each followed by a delimiter line, at most n_chars;
    "shared" or "synthetic"): the head of ../shared/data's TinyStories, else
    synthetic stories (with a warning, so the fallback is never silent)."""
    source = SHARED_DATA / "tinystories_train.txt"
    if source.is_file():
        with open(source, encoding="utf-8") as f:
            head = f.read(n_chars)
        kind = "shared"
    else:
        warnings.warn(f"{source} not found: using a synthetic corpus", stacklevel=2)
        stories = synthetic_stories(n_chars + 1000)
        head = "".join(f"{s}\n{DELIMITER}\n" for s in stories)[:n_chars]
        kind = "synthetic"
    return head[: head.rindex(f"{DELIMITER}\n") + len(DELIMITER) + 1], kind


@pytest.fixture(scope="session")
def story_corpus(tmp_path_factory):
    """A factory: story_corpus(n_chars) -> a .txt file of whole stories (see
    `story_text`), made once per size."""
    made: dict[int, Path] = {}

    def make(n_chars: int) -> Path:
        if n_chars not in made:
            path = tmp_path_factory.mktemp("corpus") / f"stories-{n_chars}.txt"
            path.write_text(story_text(n_chars)[0], encoding="utf-8")
            made[n_chars] = path
        return made[n_chars]

    return make


@pytest.fixture(scope="session")
def tiny_corpus(story_corpus) -> Path:
    """~250 KB of stories (whole ones)."""
    return story_corpus(250_000)


@pytest.fixture(scope="session")
def stories() -> list[str]:
    """About 120 KB of stories, as a list."""
    text, _ = story_text(120_000)
    return [s.strip() for s in text.split(f"{DELIMITER}\n")[:-1] if s.strip()]


@pytest.fixture(scope="session")
def tok_dir(stories, tmp_path_factory) -> Path:
    """A 400-piece tokenizer trained on `stories`."""
    from src.tokenizer.training import train_tokenizer

    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n".join(stories), encoding="utf-8")
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([path], out, vocab_size=400)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tiny_corpus, tmp_path_factory) -> dict:
    """A 512-token tokenizer and train/val token files made with the real CLIs."""
    from src.data import cli as data
    from src.tokenizer import cli as tokenizer

    out = tmp_path_factory.mktemp("dataset")
    tok_dir, data_dir = out / "tokenizer", out / "tokens"
    assert (
        tokenizer.main(
            [
                "train",
                "--input",
                str(tiny_corpus),
                "--output",
                str(tok_dir),
                "--vocab-size",
                "512",
            ]
        )
        == 0
    )
    assert (
        data.main(
            [
                "prepare",
                "--input",
                str(tiny_corpus),
                "--tokenizer",
                str(tok_dir),
                "--output",
                str(data_dir),
            ]
        )
        == 0
    )
    return {
        "tokenizer": tok_dir,
        "train": data_dir / "train.bin",
        "val": data_dir / "val.bin",
    }


@pytest.fixture(scope="session")
def train_tiny(tiny_dataset):
    """A function that trains configs/tiny.yaml on the tiny dataset through the real
    CLI, with checkpoints and logs under `out` and config overrides as keyword
    arguments (`training__max_steps=20` for training.max_steps=20) and further CLI
    arguments positionally (e.g. "--resume", "auto"). It returns the run's
    checkpoint and log folders."""
    import subprocess
    import sys

    def train(out: Path, *extra: str, **overrides) -> tuple[Path, Path]:
        sets = {
            "data.train_path": tiny_dataset["train"],
            "data.val_path": tiny_dataset["val"],
            "data.tokenizer_path": tiny_dataset["tokenizer"],
            "checkpoint.dir": out / "ck",
            "logging.dir": out / "logs",
            "logging.progress_bar": "false",
        }
        sets.update({k.replace("__", "."): v for k, v in overrides.items()})
        args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        proc = subprocess.run(
            [sys.executable, "-m", "src.train", "--config", "configs/tiny.yaml", *args,
             *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out / "ck" / "tiny", out / "logs" / "tiny"

    return train
