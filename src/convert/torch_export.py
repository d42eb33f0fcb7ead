"""Export a checkpoint for PyTorch: `python -m src.convert --checkpoint DIR --to
torch --out model.pt` writes {"state_dict", "config", "meta"}, which
`src.convert.torch_model.load` loads strictly into the reference model. Imports
torch (lazily: only this export needs it).

The file is new: an existing --out is refused before anything is converted, and
it is written under a temporary name and renamed into place, so a failure (or
Ctrl-C) leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint.contents import open_checkpoint
from ..errors import ConvertError
from ..files import atomic_file, check_writable, write_failure
from .hf import HF_DTYPE_NAMES


def to_torch(path, out, dtype: str = "fp32") -> Path:
    """Write {"state_dict", "config", "meta"} for `torch_model.Model` (strict load)
    to the new file `out`; ConvertError if it exists or cannot be written."""
    out = Path(out)
    if os.path.lexists(out):
        raise ConvertError(
            f"{out} already exists; an export never replaces a file: choose another "
            "--out (or move that one away)"
        )
    import numpy as np
    import torch

    ck = open_checkpoint(path)
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
    check_writable(out.parent)
    try:
        with atomic_file(out, replace=False) as f:
            torch.save(payload, f)  # reports I/O failures as RuntimeError
    except FileExistsError:
        raise ConvertError(f"{out} appeared while exporting; it was kept") from None
    except (OSError, RuntimeError) as e:
        raise ConvertError(write_failure(out, e)) from None
    return out
