"""The README's commands stay true: every `python -m src.X ...` it shows (in code
blocks and in tables) parses with that command's own argument parser (known
options, required arguments present, values of the right type), and the quick
start's --help prints its comment, not its code. The commands are not run here
(most need data or network); the quick start itself runs in test_train.py."""

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the module whose build_parser() parses each command
PARSERS = {
    "src.train": "src.train.cli",
    "src.data": "src.data.cli",
    "src.tokenizer": "src.tokenizer.cli",
    "src.inference": "src.inference.cli",
    "src.eval": "src.eval.cli",
    "src.convert": "src.convert.cli",
    "src.report": "src.report",
    "src.plot": "src.plot",
}


def readme_commands() -> list[str]:
    """Each `python -m src.X ...` of the README, continuation lines joined and
    trailing comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    found = []
    for line in text.splitlines():
        for cmd in re.findall(r"python -m src\.[a-z]+[^`|]*", line):
            cmd = re.split(r"\s+#", cmd)[0].strip()  # a trailing comment
            if len(cmd.split()) > 3:  # a bare `python -m src.X` names, not runs
                found.append(cmd)
    return found


COMMANDS = readme_commands()


def test_the_readme_shows_every_command():
    shown = {c.split()[2] for c in COMMANDS}
    assert shown == set(PARSERS), sorted(set(PARSERS) ^ shown)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    words = shlex.split(command)
    module = PARSERS[words[2]]
    parser = importlib.import_module(module).build_parser()
    try:
        parser.parse_args(words[3:])
    except SystemExit as exc:
        if exc.code != 0:  # --help ends with 0
            pytest.fail(f"the README's command does not parse: {command}")


def test_quickstart_help_is_its_comment():
    proc = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "--data" in proc.stdout, proc.stderr
    assert "set -e" not in proc.stdout and "#" not in proc.stdout.split("\n")[0]
