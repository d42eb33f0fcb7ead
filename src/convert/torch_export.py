"""Export a checkpoint for PyTorch: `python -m src.convert --checkpoint DIR --to
torch --out model.pt` writes {"state_dict", "config", "meta"}, which
`src.convert.torch_model.load` loads strictly into the reference model. Imports
torch (lazily: only this export needs it)."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint.contents import open_checkpoint
from ..errors import ConvertError
from ..files import check_writable
from .hf import HF_DTYPE_NAMES


def to_torch(path, out, dtype: str = "fp32") -> Path:
    """Write {"state_dict", "config", "meta"} for `torch_model.Model` (strict load)."""
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
    out = Path(out)
    check_writable(out.parent)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)  # reports I/O failures as RuntimeError
    except RuntimeError as e:
        tmp.unlink(missing_ok=True)
        raise ConvertError(f"cannot write {out}: {e}") from None
    os.replace(tmp, out)
    return out
