"""`python -m src.train --config configs/tiny.yaml`: train a model.

The config is resolved (YAML, then `--set` overrides) and checked before anything
else; `--nproc N` launches N data-parallel ranks on this machine
(`src.train.launch`), and a process started by `mlx.launch` joins its ring
(`src.train.distributed`). The run itself is `src.train.run.train`.
`--init-from PATH` (or `training.init_from`) starts a new run from another
model's weights, taking its architecture and tokenizer (`src.train.init_from`).
"""

from __future__ import annotations

import argparse
import sys

from .. import cli
from ..backend import policy
from ..checkpoint.contents import is_hf_folder
from ..config import dump_config
from ..errors import CheckpointError, UsageError
from . import distributed
from .init_from import resolve_config
from .launch import add_launch_arguments, launch
from .run import train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=cli.program("src.train"),
        description="Train a GPT-style language model with MLX.",
        epilog="Example: python -m src.train --config configs/tiny.yaml "
        "--set training.learning_rate=3e-4 --resume auto",
    )
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. training.max_steps=200 (repeatable; "
        "the last --set of a key wins; a whole section cannot be set)",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue a run: 'auto' = newest valid checkpoint of this run (a "
        "run without one starts at step 0), or a checkpoint folder (e.g. "
        "checkpoints/<run>/latest). The config passed now is used; its changes "
        "since the checkpoint are listed (key: old -> new); a changed model "
        "shape, tokenizer or batch is refused",
    )
    p.add_argument(
        "--init-from",
        metavar="PATH",
        help="start a new run (step 0, fresh optimizer and schedule) from the "
        "weights at PATH: a checkpoint of ours (checkpoints/<run> = its best, else "
        "latest; or a step folder) or a Hugging Face Llama/Qwen3 folder. Its "
        "architecture and tokenizer are the run's: leave the model section and "
        "data.tokenizer_path out, or give the same values (model.context_length "
        "may differ). Same as training.init_from. With --resume of a run that "
        "has checkpoints, the checkpoint's weights are used",
    )
    p.add_argument(
        "--rewind",
        action="store_true",
        help="with --resume PATH: go back to that checkpoint although the run has "
        "later ones; they are moved to checkpoints/<run>/rewound-<time>/ (not "
        "deleted), latest and best are reset to what remains, and the metrics "
        "log drops the steps after PATH",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start from scratch even if this run already has checkpoints "
        "(deletes them and the run's logs; refused if the run's folders hold "
        "anything else)",
    )
    p.add_argument(
        "--show-config",
        action="store_true",
        help="print the resolved config (every key, with defaults and overrides) and exit",
    )
    add_launch_arguments(p)  # --nproc, --start-timeout
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run(args: argparse.Namespace) -> int:
        if args.rewind and (not args.resume or args.resume == "auto"):
            raise UsageError(
                "--rewind needs --resume PATH, the checkpoint to go back to"
            )
        if args.overwrite and args.resume:
            raise UsageError(
                "--overwrite starts the run over and --resume continues it: pass one"
            )
        if args.resume and args.resume != "auto" and is_hf_folder(args.resume):
            raise CheckpointError(
                f"--resume {args.resume}: a Hugging Face model folder is not a run "
                "to continue; to start a new run from its weights, pass "
                f"--init-from {args.resume}"
            )
        policy.configure_process()
        cfg, _ = resolve_config(args.config, args.set, args.init_from)
        if args.show_config:
            print(dump_config(cfg), end="")
            return 0
        if args.nproc > 1:
            return launch(argv, args.nproc, cfg)
        dist = distributed.init(cfg, args.start_timeout)
        return train(cfg, args.resume, args.overwrite, dist, args.rewind)

    try:
        prefix = f"error{distributed.rank_tag()}"
        return cli.command(build_parser(), argv, run, catch=(), prefix=prefix)
    except RuntimeError as exc:  # distributed: e.g. another rank died
        return distributed.report_failure(exc)
