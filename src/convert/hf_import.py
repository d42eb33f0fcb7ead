"""`--from hf`: a Hugging Face Llama/Qwen3 folder (or Mixtral/Qwen3-MoE; config.json, *.safetensors,
and its tokenizer: our tokenizer.model, else a Hugging Face tokenizer.json)
becomes a checkpoint of a new run folder. Reading the folder is
`src.checkpoint.hf_folder`'s (inference and eval read one in memory too).

The run folder must be new (absent or empty): an import never replaces a
checkpoint nor joins another run, and that is checked before anything is read.
Every value of config.json is checked (type and range) and every tensor (a
damaged file, NaN or inf, names and shapes against config.json), each failure
one error naming the file and the key or tensor. The run folder is built under a
temporary name beside --out and renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..checkpoint import store
from ..checkpoint.contents import build_meta
from ..checkpoint.hf_folder import load_weights, our_config, read_config
from ..errors import ConvertError, TokenizerError
from ..files import check_writable, write_failure
from ..tokenizer.kinds import load_tokenizer


def check_new_run(out: Path) -> None:
    """ConvertError unless `out` is free for an import (absent or an empty folder):
    an import never replaces a checkpoint, nor mixes into another run."""
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ConvertError(f"--out {out} is a file; import into a new folder")
    steps = [p.name for p in store.list_checkpoints(out)]
    held = steps or sorted(p.name for p in out.iterdir())
    if held:
        what = f"checkpoint {held[-1]}" if steps else held[0]
        more = f" and {len(held) - 1} more" if len(held) > 1 else ""
        raise ConvertError(
            f"--out {out} already holds {what}{more}; an import never replaces a "
            "checkpoint nor joins another run: choose a new --out folder"
        )


def from_hf(folder, out) -> Path:
    """Import a Hugging Face folder into `<out>/step_<N>/` of a new run folder
    `out` (refused up front if it holds anything); returns the checkpoint.

    The run folder is built under a temporary name beside `out` and renamed into
    place, so a failure or Ctrl-C leaves nothing."""
    folder, out = Path(folder), Path(out)
    check_new_run(out)
    c = read_config(folder)
    cfg, step = our_config(c, folder / "config.json", out.name)
    weights = load_weights(folder, cfg)

    check_writable(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        try:  # ours (tokenizer.model), else the folder's Hugging Face one
            tok = load_tokenizer(folder)
        except TokenizerError as e:
            tok = None
            print(f"warning: not importing a tokenizer: {e}", file=sys.stderr)
        sha, kind = (tok.sha256, tok.kind) if tok else (None, None)
        meta = build_meta(cfg, sha, kind, imported_from=str(folder.resolve()))
        run = tmp / "run"
        saved = store.save_checkpoint(
            run, step, weights, {}, meta, keep_last=0, tokenizer=tok
        )
        check_new_run(out)  # again: nothing appeared there meanwhile
        os.rename(run, out)  # an empty folder `out` is replaced, a full one not
    except OSError as e:
        raise ConvertError(write_failure(out, e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / saved.name
