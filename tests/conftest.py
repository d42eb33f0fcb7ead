"""Shared fixtures. Importing `src` first loads the optimized BLAS before any test
module imports mlx.core (see src/blas.py)."""

from pathlib import Path

import pytest

import src  # noqa: F401  (must precede every mlx import)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """~250 KB of real TinyStories text (whole stories), from ../shared/data."""
    src_file = SHARED_DATA / "tinystories_train.txt"
    if not src_file.exists():
        pytest.skip(f"{src_file} not found (the shared corpora sit beside the repo)")
    text = src_file.read_text(encoding="utf-8")[:250_000]
    text = text[: text.rfind("<|endoftext|>\n") + len("<|endoftext|>\n")]
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def stories() -> list[str]:
    """The first ~120 KB of TinyStories as a list of stories."""
    source = SHARED_DATA / "tinystories_train.txt"
    if not source.is_file():
        pytest.skip(f"{source} not found (the shared corpora sit beside the repo)")
    with open(source, encoding="utf-8") as f:
        head = f.read(120_000)
    return [s.strip() for s in head.split("<|endoftext|>\n")[:-1] if s.strip()]


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
