"""`python -m src.convert`: checkpoints to PyTorch, Hugging Face and GGUF
(llama.cpp, Ollama), and Hugging Face folders back.

    python -m src.convert --checkpoint DIR --to torch --out out/model.pt
    python -m src.convert --checkpoint DIR --to hf --out out/hf [--dtype bf16]
    python -m src.convert --checkpoint DIR --to gguf --out out/model.gguf [--dtype fp16]
    python -m src.convert --from hf out/hf --out checkpoints/imported
    python -m src.convert --checkpoint DIR --to hf --out out/small --ffn-fraction 0.5

`--to hf` and `--from hf` need transformers (an mlx-lm dependency); only
`--to torch` imports torch, lazily (`torch_export`), and only `--to gguf` the
`gguf` package (`gguf`).

`--ffn-fraction F` exports one trained FFN width of a MatFormer model
(`model.matformer_widths`) as a plain, smaller model (d_ff = F * ffn_dim, the
first neurons of each FFN; `torch_export.at_width`): `--to hf` gives a plain
Llama/Qwen3 folder. A MatFormer model exported to hf or gguf without it is its
whole width (F = 1.0), a plain model too. hf and gguf read the width from a
checkpoint written to a temporary folder (deleted after).

Every --out is new: an existing .pt or .gguf file, a non-empty folder, or a run folder
that holds anything is refused before anything is converted (nothing is ever
written over), and each output is built under a temporary name and renamed into
place, so a failure or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .. import cli
from ..backend.policy import DTYPES
from ..checkpoint import store
from ..checkpoint.contents import open_checkpoint, open_source
from ..errors import UsageError, UserError
from ..tokenizer.kinds import load_tokenizer, tokenizer_kind
from . import torch_export
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
        "--ffn-fraction",
        type=cli.number_in(0.0, 1.0, lo_open=True),
        metavar="F",
        help="a MatFormer model (model.matformer_widths): export its trained FFN "
        "width F as a plain, smaller model (the first F of each layer's FFN "
        "neurons; d_ff = F * ffn_dim)",
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
    if args.from_hf and args.ffn_fraction is not None:
        raise UsageError("--ffn-fraction is for --checkpoint --to ... (an export)")
    try:
        if args.from_hf:
            path = from_hf(args.from_hf[1], args.out)
        elif args.to == "torch":
            path = to_torch(args.checkpoint, args.out, args.dtype, args.ffn_fraction)
        else:
            export = to_gguf if args.to == "gguf" else to_hf
            with export_source(args.checkpoint, args.ffn_fraction) as checkpoint:
                path = export(checkpoint, args.out, args.dtype)
    except ImportError as e:
        extra = EXTRAS.get((e.name or "").split(".")[0], "torch")
        raise UserError(f"{e.name} is needed: pip install -e '.[{extra}]'") from None
    print(f"wrote {path}")


@contextlib.contextmanager
def export_source(path: str, fraction: float | None) -> Iterator[str | Path]:
    """The checkpoint an hf or gguf export reads: `path` itself, or for a
    MatFormer model (or a --ffn-fraction) its width `fraction` (default 1.0) as
    a plain checkpoint in a temporary folder, deleted after."""
    if fraction is None:
        try:
            header = open_source(path, verify=False)  # the export verifies
        except UserError:  # the export names what is wrong, as always
            header = None
        if header is None or not header.config.model.matformer_widths:
            yield path
            return
    ck = torch_export.at_width(open_checkpoint(path), fraction or 1.0)
    tok = None
    if ck.tokenizer_dir is not None and tokenizer_kind(ck.tokenizer_dir):
        tok = load_tokenizer(ck.tokenizer_dir)
    with tempfile.TemporaryDirectory(prefix="slm-convert-") as tmp:
        yield store.save_checkpoint(
            tmp, ck.meta.get("step") or 0, ck.weights, {}, ck.meta, tokenizer=tok
        )
