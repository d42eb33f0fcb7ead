"""`python -m src.convert`: checkpoints to PyTorch, Hugging Face and GGUF
(llama.cpp, Ollama), and Hugging Face folders back.

    python -m src.convert --checkpoint DIR --to torch --out out/model.pt
    python -m src.convert --checkpoint DIR --to hf --out out/hf [--dtype bf16]
    python -m src.convert --checkpoint DIR --to gguf --out out/model.gguf [--dtype fp16]
    python -m src.convert --from hf out/hf --out checkpoints/imported

`--to hf` and `--from hf` need transformers (an mlx-lm dependency); only
`--to torch` imports torch, lazily (`torch_export`), and only `--to gguf` the
`gguf` package (`gguf`).

Every --out is new: an existing .pt or .gguf file, a non-empty folder, or a run folder
that holds anything is refused before anything is converted (nothing is ever
written over), and each output is built under a temporary name and renamed into
place, so a failure or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import argparse

from .. import cli
from ..backend.policy import DTYPES
from ..errors import UsageError, UserError
from .gguf import to_gguf
from .hf import to_hf
from .hf_import import from_hf
from .torch_export import to_torch

# The optional package of each export, and the pyproject extra that installs it.
EXTRAS = {"torch": "torch", "gguf": "gguf"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=cli.program("src.convert"),
        description="Convert a checkpoint to a PyTorch state_dict, a Hugging Face "
        "folder\n(transformers, mlx-lm) or a GGUF file (llama.cpp, Ollama), or "
        "import a Hugging\nFace folder back.",
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
    p.add_argument("--to", choices=("torch", "hf", "gguf"), help="export format")
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="always new, never written over: torch: a .pt file; hf: a folder; "
        "gguf: a .gguf file; "
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
        raise UsageError("--checkpoint needs --to torch, hf or gguf")
    if args.from_hf and (args.from_hf[0] != "hf" or args.to):
        raise UsageError("use --from hf DIR --out RUN_DIR (without --to)")
    try:
        if args.from_hf:
            path = from_hf(args.from_hf[1], args.out)
        elif args.to == "torch":
            path = to_torch(args.checkpoint, args.out, args.dtype)
        elif args.to == "gguf":
            path = to_gguf(args.checkpoint, args.out, args.dtype)
        else:
            path = to_hf(args.checkpoint, args.out, args.dtype)
    except ImportError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0], "torch")
        raise UserError(f"{e.name} is needed: pip install -e '.[{extra}]'") from None
    print(f"wrote {path}")
