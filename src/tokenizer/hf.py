"""A Hugging Face tokenizer (`tokenizer.json`, read by the `tokenizers` library):
the second kind of tokenizer, for models that come with one (byte-level BPE as in
GPT-2, Llama 3 and Qwen, or a SentencePiece model converted to that format).

It offers what `src.tokenizer.spm.Tokenizer` offers (see `src.tokenizer.kinds`),
with the same conventions: `encode` adds no special token unless asked
(`bos`/`eos`), special tokens decode to "", and a special token's text in the
input ("<|endoftext|>") becomes its id, as transformers does. BOS, EOS, PAD and
UNK are the tokens `tokenizer_config.json` names (else `special_tokens_map.json`,
else the ids in the model's `config.json`); an EOS is required, since documents
end with it. A byte-level BPE without a normalizer round-trips exactly:
`decode(encode(s)) == s` for text holding no special token's text; a tokenizer
that normalizes (NFC in Qwen2) or has an <unk> does so only up to that.
`sha256` hashes tokenizer.json and the BOS/EOS ids used with it, which is all that
decides the ids of a token file. This module imports neither MLX nor torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer

from ..errors import TokenizerError, utf8_problem

HF_FILE, HF_CONFIG = "tokenizer.json", "tokenizer_config.json"
SPECIAL_MAP = "special_tokens_map.json"
# The files of a Hugging Face tokenizer, copied with it (those present).
HF_FILES = (HF_FILE, HF_CONFIG, SPECIAL_MAP, "chat_template.jinja")
ROLES = ("bos", "eos", "pad", "unk")


def _read_json(path: Path) -> dict:
    """`path` as a JSON object ({} when absent); TokenizerError naming it if damaged."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a str, or an
    AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _special_ids(tk: _Tokenizer, folder: Path, vocab: int) -> dict[str, int | None]:
    """{"bos", "eos", "pad", "unk": id or None}: the tokens tokenizer_config.json
    (else special_tokens_map.json) names, else config.json's `<role>_token_id`
    (the first of a list). TokenizerError for a named token not in the vocabulary
    or an id outside it."""
    named = {**_read_json(folder / SPECIAL_MAP), **_read_json(folder / HF_CONFIG)}
    model = _read_json(folder / "config.json")
    ids: dict[str, int | None] = {}
    for role in ROLES:
        text = _token_text(named.get(f"{role}_token"))
        if text is not None:
            i = tk.token_to_id(text)
            if i is None:
                raise TokenizerError(
                    f"{folder}: {role}_token {text!r} (from {HF_CONFIG} or "
                    f"{SPECIAL_MAP}) is not in {HF_FILE}"
                )
            ids[role] = i
            continue
        i = model.get(f"{role}_token_id")
        if isinstance(i, list):
            i = i[0] if i else None
        if i is not None and (isinstance(i, bool) or not isinstance(i, int)):
            i = None  # not an id: as if absent
        if i is not None and not 0 <= i < vocab:
            raise TokenizerError(
                f"{folder / 'config.json'}: {role}_token_id {i} is outside the "
                f"{vocab} tokens of {HF_FILE}"
            )
        ids[role] = i
    return ids


class HFTokenizer:
    """A Hugging Face `tokenizer.json` behind this project's tokenizer interface."""

    kind = "huggingface"
    files = HF_FILES

    def __init__(
        self, tk: _Tokenizer, directory: Path, ids: dict, sha256: str, vocab: int
    ):
        self._tk, self.dir, self.sha256, self.vocab_size = tk, directory, sha256, vocab
        self.file = directory / HF_FILE
        self.bos_id, self.eos_id, self.unk_id = ids["bos"], ids["eos"], ids["unk"]
        # left padding of a batch is masked: any id does; EOS when there is no PAD
        self.pad_id = ids["pad"] if ids["pad"] is not None else ids["eos"]
        self._threads = os.cpu_count() or 1
        self._ids = ids

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> HFTokenizer:
        """Load from a folder holding tokenizer.json (and usually
        tokenizer_config.json), or from the tokenizer.json file; `encode_batch`
        uses every core unless `threads` is 1. TokenizerError naming the file
        when it is missing or damaged, or when no EOS token is named."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        file = folder / HF_FILE if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{folder}: no {HF_FILE} (a Hugging Face tokenizer)")
        try:
            data = file.read_bytes()
            tk = _Tokenizer.from_str(data.decode("utf-8"))
        except OSError as e:
            raise TokenizerError(
                f"{file}: cannot read it ({e.strerror or e})"
            ) from None
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{file}: not UTF-8 text (byte {e.start})") from None
        except Exception as e:  # the tokenizers library raises bare Exceptions
            raise TokenizerError(
                f"{file}: not a Hugging Face tokenizer ({str(e) or type(e).__name__})"
            ) from None
        # ids need not be dense: the size is the largest id + 1
        vocab = max(tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        ids = _special_ids(tk, folder, vocab)
        if ids["eos"] is None:
            raise TokenizerError(
                f"{folder}: no EOS token: name one as eos_token in {HF_CONFIG} "
                f'(e.g. {{"eos_token": "<|endoftext|>"}})'
            )
        h = hashlib.sha256(data)
        h.update(json.dumps({"bos": ids["bos"], "eos": ids["eos"]}).encode())
        tok = cls(tk, folder, ids, h.hexdigest(), vocab)
        tok._threads = threads or tok._threads
        return tok

    def _check(self, texts: list, e: Exception) -> None:
        """TokenizerError saying why the library refused a text, if it is one we
        can name (not valid UTF-8); else nothing (the caller re-raises)."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TokenizerError(f"cannot encode {type(text).__name__}: not text")
            if why := utf8_problem(text):
                where = f"text {i} of the batch" if len(texts) > 1 else "the text"
                raise TokenizerError(f"cannot encode {where}: {why}") from e

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id is None:
            raise TokenizerError(f"{self.dir}: this tokenizer has no BOS token")
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (no special tokens added unless `bos`/`eos`);
        TokenizerError if `text` is not valid UTF-8."""
        try:
            ids = self._tk.encode(text, add_special_tokens=False).ids
        except Exception as e:  # TypeError for a str with a lone surrogate
            self._check([text], e)
            raise
        return self._wrap(ids, bos, eos)

    def encode_batch(
        self, texts: Iterable[str], bos: bool = False, eos: bool = False
    ) -> list[list[int]]:
        """Same as [encode(t) for t in texts], on all cores unless threads == 1
        (the library's thread pool would not survive a fork of a worker)."""
        texts = list(texts)
        if self._threads == 1:
            return [self.encode(t, bos, eos) for t in texts]
        try:
            # encode_batch_fast (tokenizers >= 0.21) skips the offsets we never use
            batch = getattr(self._tk, "encode_batch_fast", self._tk.encode_batch)
            out = batch(texts, add_special_tokens=False)
        except Exception as e:  # TypeError for a str with a lone surrogate
            self._check(texts, e)
            raise
        return [self._wrap(e.ids, bos, eos) for e in out]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (a list or array); special tokens decode to ""."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise TokenizerError(f"token id {bad} is outside [0, {self.vocab_size})")
        return self._tk.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tk.id_to_token(i) or ""

    def config_json(self) -> bytes:
        """A tokenizer_config.json naming the special tokens this tokenizer was
        loaded with (for a copy of a folder that named them in config.json)."""
        named = {
            f"{role}_token": self._tk.id_to_token(i)
            for role, i in self._ids.items()
            if i is not None
        }
        return (json.dumps(named, indent=2) + "\n").encode()
