"""The SentencePiece tokenizer: the wrapper and the special ids (training is in
`src.tokenizer.training`, the command line in `src.tokenizer.cli`).

`decode(encode(s)) == s` for any str that is valid Unicode, because training uses
- byte_fallback: a character missing from the vocab becomes its UTF-8 byte pieces,
  so nothing is ever <unk>;
- identity normalization, remove_extra_whitespaces=False, add_dummy_prefix=False:
  no NFKC, whitespace runs, tabs, CR, NUL and leading spaces are kept as they are.
sentencepiece trains on lines, so no piece contains "\\n": a newline is the byte
piece <0x0A>. It also writes spaces as U+2581 "▁" and decodes every "▁" piece back
to a space, so a literal "▁" in the text would come back as " ": the wrapper
encodes it as its three byte pieces, which decode to "▁" again.
This module imports neither MLX nor torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from ..errors import TokenizerError, utf8_problem

# Special tokens; the id of each is its index. pad, unk, bos, eos come first.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))
N_BYTE_PIECES = 256
MIN_VOCAB = len(SPECIAL_TOKENS) + len(CHAT_MARKERS) + N_BYTE_PIECES + 1  # + 1 char
MODEL_FILE, INFO_FILE = "tokenizer.model", "tokenizer_info.json"
# Where folders made before the Hugging Face kind kept the info file: that name is
# Hugging Face's tokenizer.json, so it moved; such folders still load.
LEGACY_INFO_FILE = "tokenizer.json"
# The files of a tokenizer of this kind, copied with it (those present).
SPM_FILES = (MODEL_FILE, INFO_FILE, LEGACY_INFO_FILE)
WS = "\u2581"  # sentencepiece's whitespace marker
MAX_VOCAB = 2**20  # 4x the largest vocabularies in use; model.vocab_size's limit too


def _check_text(texts: list[str]) -> None:
    """TokenizerError naming the first text that is not valid UTF-8 (checked only
    after sentencepiece refused one: free on the path that works)."""
    for i, text in enumerate(texts):
        if isinstance(text, str) and (why := utf8_problem(text)):
            where = f"text {i} of the batch" if len(texts) > 1 else "the text"
            raise TokenizerError(f"cannot encode {where}: {why}")


def read_info(folder: Path) -> dict | None:
    """The info file `src.tokenizer train` wrote beside tokenizer.model (model
    type, corpus, seed...), under its name or its legacy one; None if absent."""
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return legacy_info(Path(folder) / LEGACY_INFO_FILE)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def legacy_info(path: Path) -> dict | None:
    """The info file at `path` if it is one of ours under the legacy name
    tokenizer.json (it names its sentencepiece version; a Hugging Face
    tokenizer.json does not), else None. Ours are a few KB: a large file is not
    parsed."""
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return None
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "sentencepiece_version" in info else None


def missing_tokenizer(path: Path) -> str:
    """The message for a tokenizer folder that is not there: the two commands
    that make one at `path` (a vocabulary size read from a `tokenizer-N` name)."""
    m = re.fullmatch(r"tokenizer-(\d+)", path.name)
    vocab = m.group(1) if m else "8192"
    script = f"VOCAB_SIZE={vocab} ./scripts/prepare_data.sh"
    if path != Path(f"data/tokenizer-{vocab}"):  # where the script writes it
        script = f"TOKENIZER={path} {script}"
    return (
        f"no tokenizer at {path} (neither {MODEL_FILE} nor a Hugging Face "
        f"tokenizer.json): make one with `python -m "
        f"src.tokenizer train --input TEXT --output {path} --vocab-size {vocab}` "
        f"or `{script}`"
    )


class Tokenizer:
    """A trained SentencePiece model with this project's special ids."""

    kind = "sentencepiece"
    files = SPM_FILES

    def __init__(self, sp: spm.SentencePieceProcessor, sha256: str, directory: Path):
        self._sp, self.sha256, self.dir = sp, sha256, directory
        self.file = directory / MODEL_FILE
        self._threads = os.cpu_count() or 1
        # The byte pieces that spell a literal "▁" (see the module docstring).
        self._ws_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in WS.encode()]

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> Tokenizer:
        """Load from a folder holding tokenizer.model, or from the .model file;
        `encode_batch` uses `threads` threads (default: every core). A Hugging
        Face tokenizer.json (a folder with it but no tokenizer.model, or the file)
        loads as that kind (`src.tokenizer.hf`), for callers written when there
        was one kind; new code calls `src.tokenizer.kinds.load_tokenizer`."""
        path = Path(path)
        hf_file = path if path.suffix == ".json" else path / LEGACY_INFO_FILE
        if path.suffix == ".json" or (
            not (path / MODEL_FILE).is_file()
            and hf_file.is_file()
            and legacy_info(hf_file) is None
        ):
            from .hf import HFTokenizer  # loads the tokenizers library

            return HFTokenizer.load(hf_file, threads)
        return cls.load_spm(path, threads)

    @classmethod
    def load_spm(cls, path: str | Path, threads: int | None = None) -> Tokenizer:
        """`load`, of this kind only."""
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise TokenizerError(missing_tokenizer(path))
        data = model.read_bytes()
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:
            raise TokenizerError(f"{model}: not a sentencepiece model ({e})") from None
        ids = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID) or not sp.is_byte(
            sp.piece_to_id("<0x00>")
        ):
            raise TokenizerError(
                f"{model}: not trained by src.tokenizer (pad/unk/bos/eos ids {ids}, "
                "or no byte fallback)"
            )
        tok = cls(sp, hashlib.sha256(data).hexdigest(), model.parent)
        tok.file = model
        tok._threads = threads or tok._threads
        return tok

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    # The same for every model this module trains (checked in `load`).
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally with BOS/EOS; chat markers such as
        "<|user|>" in the text become their ids. TokenizerError if `text` is not
        valid UTF-8 (a lone surrogate: an invalid byte of argv or stdin)."""
        try:
            if WS in text:
                parts = [self._sp.encode(part) for part in text.split(WS)]
                ids = parts[0]
                for part in parts[1:]:
                    ids += self._ws_ids + part
            else:
                ids = self._sp.encode(text)
        except (RuntimeError, TypeError):  # sentencepiece refuses the str: say why
            _check_text([text])
            raise
        return [BOS_ID] * bos + ids + [EOS_ID] * eos

    def encode_batch(
        self, texts: Iterable[str], bos: bool = False, eos: bool = False
    ) -> list[list[int]]:
        """Same as [encode(t) for t in texts], on all cores."""
        texts = list(texts)
        try:
            out = self._sp.encode(
                texts, add_bos=bos, add_eos=eos, num_threads=self._threads
            )
        except (RuntimeError, TypeError):
            _check_text(texts)
            raise
        for i, text in enumerate(texts):
            if WS in text:  # rare: take the exact path
                out[i] = self.encode(text, bos, eos)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (a list or array); special tokens decode to ""."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise TokenizerError(f"token id {bad} is outside [0, {self.vocab_size})")
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)
