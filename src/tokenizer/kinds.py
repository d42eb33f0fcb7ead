"""One tokenizer interface, two kinds, and the one place that picks the kind.

- "sentencepiece" (`src.tokenizer.spm.Tokenizer`): a folder with `tokenizer.model`,
  the kind `python -m src.tokenizer train` makes;
- "huggingface" (`src.tokenizer.hf.HFTokenizer`): a folder with a Hugging Face
  `tokenizer.json` (and `tokenizer_config.json`), as models on the Hub come.

A folder that holds both (a model exported by `src.convert --to hf`) is ours, the
SentencePiece one; a `tokenizer.model` we did not train (Llama 2's) gives way to
the folder's tokenizer.json. Everything that loads a tokenizer (data preparation,
training, evaluation, inference, export) goes through `load_tokenizer`, and uses
only what `TokenizerLike` lists. No MLX or torch here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from ..errors import TokenizerError
from ..files import atomic_file
from .spm import MODEL_FILE, Tokenizer, legacy_info, missing_tokenizer

# src.tokenizer.hf's names, without importing the tokenizers library
HF_FILE, HF_CONFIG = "tokenizer.json", "tokenizer_config.json"
KINDS = ("sentencepiece", "huggingface")


class TokenizerLike(Protocol):
    """What every kind offers. Ids of special tokens: `eos_id` always, `bos_id`
    and `unk_id` when the tokenizer has one (else None), `pad_id` some id (left
    padding is masked). `sha256` identifies the ids it makes (token files and
    checkpoints record it); `dir` is its folder, `file` the file it was loaded
    from there (what `load_tokenizer` loads again, whatever else the folder
    holds), `files` the names of the files that make it."""

    kind: str
    dir: Path
    file: Path
    sha256: str
    files: tuple[str, ...]
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int
    unk_id: int | None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def encode_batch(
        self, texts: Iterable[str], bos: bool = False, eos: bool = False
    ) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def id_to_piece(self, i: int) -> str: ...


def tokenizer_kind(folder: str | Path) -> str | None:
    """The kind of tokenizer `folder` holds by its files (None: neither), without
    loading it: tokenizer.model first, then a tokenizer.json that is not our own
    legacy info file."""
    folder = Path(folder)
    if (folder / MODEL_FILE).is_file():
        return "sentencepiece"
    if (folder / HF_FILE).is_file() and legacy_info(folder / HF_FILE) is None:
        return "huggingface"
    return None


def load_tokenizer(path: str | Path, threads: int | None = None) -> TokenizerLike:
    """The tokenizer in folder `path` (or the tokenizer.model / tokenizer.json file
    `path`), of the kind its files say (`tokenizer_kind`); `threads` for
    `encode_batch` (default: every core). TokenizerError naming the folder and
    what is missing when it holds neither kind, or naming the file that is
    damaged."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".json"):
            return _load_hf(path, threads)
        return Tokenizer.load_spm(path, threads)
    if not path.is_dir():
        raise TokenizerError(missing_tokenizer(path))
    kind = tokenizer_kind(path)
    if kind == "sentencepiece":
        try:
            return Tokenizer.load_spm(path, threads)
        except TokenizerError:
            if (path / HF_FILE).is_file() and legacy_info(path / HF_FILE) is None:
                return _load_hf(path, threads)  # e.g. Llama 2's own tokenizer.model
            raise
    if kind == "huggingface":
        return _load_hf(path, threads)
    if legacy_info(path / HF_FILE) is not None:
        raise TokenizerError(
            f"no tokenizer at {path}: its {HF_FILE} is the info file of a "
            f"SentencePiece tokenizer, but its {MODEL_FILE} is missing"
        )
    raise TokenizerError(missing_tokenizer(path))


def _load_hf(path: Path, threads: int | None):
    from .hf import HFTokenizer  # imports the tokenizers library: only when needed

    return HFTokenizer.load(path, threads)


def save_tokenizer(tok: TokenizerLike, dest: str | Path) -> list[Path]:
    """Copy the files that make `tok` (its `files` present in its folder) into
    the folder `dest`, made if needed; the copies. Only those: a model folder
    used as a tokenizer folder keeps its weights to itself. A Hugging Face
    tokenizer whose special tokens came from the model's config.json gets a
    tokenizer_config.json naming them, so the copy loads alone, with the same
    sha256. A file already in `dest` is never replaced: TokenizerError."""
    dest = Path(dest)
    files = {n: tok.dir / n for n in tok.files if (tok.dir / n).is_file()}
    data = {n: f.read_bytes() for n, f in files.items()}
    if tok.kind == "huggingface" and HF_CONFIG not in data:
        data[HF_CONFIG] = tok.config_json()
    copies = []
    for name, content in data.items():
        try:
            with atomic_file(dest / name, replace=False) as f:
                f.write(content)
        except FileExistsError:
            raise TokenizerError(f"{dest / name} exists: not replaced") from None
        copies.append(dest / name)
    return copies
