"""`python -m src.convert`: checkpoints to PyTorch and Hugging Face, and Hugging
Face folders back.

    python -m src.convert --checkpoint DIR --to torch --out out/model.pt
    python -m src.convert --checkpoint DIR --to hf --out out/hf [--dtype bf16]
    python -m src.convert --from hf out/hf --out checkpoints/imported

`--to hf` and `--from hf` need transformers (an mlx-lm dependency); only
`--to torch` imports torch, lazily (`torch_export`).

Every --out is new: an existing .pt file, a non-empty folder, or a run folder
that holds anything is refused before anything is converted (nothing is ever
written over), and each output is built under a temporary name and renamed into
place, so a failure or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import argparse

from .. import cli
from ..backend.policy import DTYPES
from ..errors import UsageError, UserError
from .hf import to_hf
from .hf_import import from_hf
from .torch_export import to_torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m src.convert",
        description="Convert a checkpoint to a PyTorch state_dict or to a Hugging "
        "Face folder\n(transformers, mlx-lm), or import a Hugging Face folder back.",
        epilog="examples:\n" + __doc__.split("\n\n")[1],  # the docstring's usage
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="our checkpoint folder")
    src.add_argument(
        "--from",
        dest="from_hf",
        nargs=2,
        metavar=("hf", "DIR"),
        help="import a Hugging Face Llama/Qwen3 folder",
    )
    p.add_argument("--to", choices=("torch", "hf"), help="export format")
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="always new, never written over: torch: a .pt file; hf: a folder; "
        "--from: a run folder that gets step_<N>/ and a `latest` link (absent "
        "or empty)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="fp32",
        help="weight dtype on export (default fp32: lossless)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    return cli.command(build_parser(), argv, convert)


def convert(args: argparse.Namespace) -> None:
    if args.checkpoint and not args.to:
        raise UsageError("--checkpoint needs --to torch or --to hf")
    if args.from_hf and (args.from_hf[0] != "hf" or args.to):
        raise UsageError("use --from hf DIR --out RUN_DIR (without --to)")
    try:
        if args.from_hf:
            path = from_hf(args.from_hf[1], args.out)
        elif args.to == "torch":
            path = to_torch(args.checkpoint, args.out, args.dtype)
        else:
            path = to_hf(args.checkpoint, args.out, args.dtype)
    except ImportError as e:
        raise UserError(f"{e.name} is needed: pip install -e '.[torch]'") from None
    print(f"wrote {path}")
