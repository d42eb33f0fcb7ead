"""Export a checkpoint for PyTorch: `python -m src.convert --checkpoint DIR --to
torch --out model.pt` writes {"state_dict", "config", "meta"}, which
`src.convert.torch_model.load` loads strictly into the reference model. Imports
torch (lazily: only this export needs it).

`--ffn-fraction F` (a MatFormer model, `model.matformer_widths`) exports one of
its trained FFN widths as a plain, smaller model (`at_width`): d_ff = its
neurons, gate/up rows and down columns cut to them, no MatFormer widths.

The file is new: an existing --out is refused before anything is converted, and
it is written under a temporary name and renamed into place, so a failure (or
Ctrl-C) leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..checkpoint.contents import Checkpoint, open_checkpoint
from ..errors import ConvertError
from ..files import atomic_file, check_writable, write_failure
from ..model import matformer
from .hf import HF_DTYPE_NAMES

# meta.json numbers of the whole model that are not the exported width's
WHOLE_MODEL_ONLY = ("val_loss", "best_val_loss")


def at_width(ck: Checkpoint, fraction: float) -> Checkpoint:
    """The checkpoint of one trained MatFormer FFN width of `ck` (ConfigError
    if it has none there, `matformer.check_fraction`), as a plain model: config
    d_ff = its neurons and no matformer_widths, FFN weights cut to them, no
    optimizer state, meta with `matformer_width`: {fraction, of_ffn_dim}. Below
    1.0 the run_name says the width (`<run>-ffn0.25`) and the meta loses the
    whole model's validation loss."""
    m = ck.config.model
    fraction = matformer.check_fraction(m, fraction, str(ck.path))
    if fraction == 1.0:  # the whole model: its run and validation are this one's
        cfg = dataclasses.replace(
            ck.config, model=dataclasses.replace(m, matformer_widths=[])
        )
        meta = dict(ck.meta)
    else:
        cfg = matformer.sub_width_config(ck.config, fraction)
        meta = {k: v for k, v in ck.meta.items() if k not in WHOLE_MODEL_ONLY}
    meta.update(
        config=cfg.to_dict(),
        matformer_width={"fraction": fraction, "of_ffn_dim": m.ffn_dim},
    )
    weights = matformer.slice_weights(ck.weights, m.ffn_dim, fraction)
    return dataclasses.replace(ck, config=cfg, weights=weights, optimizer={}, meta=meta)


def to_torch(path, out, dtype: str = "fp32", ffn_fraction: float | None = None) -> Path:
    """Write {"state_dict", "config", "meta"} for `torch_model.Model` (strict load)
    to the new file `out` (with `ffn_fraction`: that MatFormer width, `at_width`);
    ConvertError if it exists or cannot be written."""
    out = Path(out)
    if os.path.lexists(out):
        raise ConvertError(
            f"{out} already exists; an export never replaces a file: choose another "
            "--out (or move that one away)"
        )
    import numpy as np
    import torch

    ck = open_checkpoint(path)
    if ffn_fraction is not None:
        ck = at_width(ck, ffn_fraction)
    cfg, weights, meta = ck.config, ck.weights, ck.meta
    # fp32 -> numpy -> torch is exact; the cast to bf16/fp16 happens in torch.
    state = {
        k: torch.from_numpy(np.array(v)).to(getattr(torch, HF_DTYPE_NAMES[dtype]))
        for k, v in sorted(weights.items())
    }
    payload = {
        "state_dict": state,
        "config": cfg.model.__dict__.copy(),
        "meta": {"step": meta.get("step"), "dtype": dtype},
    }
    if "matformer_width" in meta:
        payload["meta"]["matformer_width"] = meta["matformer_width"]
    check_writable(out.parent)
    try:
        with atomic_file(out, replace=False) as f:
            torch.save(payload, f)  # reports I/O failures as RuntimeError
    except FileExistsError:
        raise ConvertError(f"{out} appeared while exporting; it was kept") from None
    except (OSError, RuntimeError) as e:
        raise ConvertError(write_failure(out, e)) from None
    return out
