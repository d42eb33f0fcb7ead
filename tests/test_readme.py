"""The README works as written.

`test_readme_walkthrough` runs every command of the README's ```bash blocks, in
order, and its ```python blocks, in a scratch copy of the repository:
- `data/raw/` holds the first 1.5 MB of the shared TinyStories sample (what
  `python -m src.data download` would have written; the download needs network);
- every config of `configs/` is shrunk (a 1-layer, 32-wide model on 32-token
  windows, batch 2; every step count ÷ 50, and so the `step_N` of a command's
  checkpoint path and its `--set training.max_steps`), so a run takes seconds;
  vocabularies and data paths stay;
- a command whose comment says `needs network` is parsed, not run; a command whose
  comment says `Ctrl-C` gets a SIGINT once its first checkpoint is committed, and
  must then exit 0 (it saves); `--interactive` gets two lines on stdin.
Every command must exit 0. Commands the walkthrough does not run are listed in
NOT_RUN with the test that runs them instead.

Every `python -m src.X ...` in the README and in docs/*.md also parses with that
command's own parser (known options, required arguments, values of the right type).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
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
# README commands the walkthrough does not run, and the test that does
NOT_RUN = {
    "bash scripts/quickstart.sh": "test_quickstart_script_end_to_end",
    "bash scripts/test.sh": "(the test suite itself)",
    "python3 -m venv .venv && source .venv/bin/activate": "(the environment the suite runs in)",
    "pip install -e .": "(the environment the suite runs in)",
}
SCALE = 50  # step counts in the walkthrough: ÷ SCALE


def _joined(text: str) -> str:
    return re.sub(r"\\\n\s*", " ", text)  # shell line continuations


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block of a markdown file, in order."""
    text = path.read_text(encoding="utf-8")
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)


def bash_commands(body: str) -> list[tuple[str, str]]:
    """(command, comment) of each line of a bash block; comment-only lines are
    the previous command's comment, continuation lines are joined."""
    found: list[tuple[str, str]] = []
    for line in _joined(body).splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            if found:
                found[-1] = (found[-1][0], found[-1][1] + " " + line.strip())
            continue
        command, comment = (re.split(r"\s{2,}#", line, maxsplit=1) + [""])[:2]
        found.append((command.strip(), comment.strip()))
    return found


def module_commands(path: Path) -> list[str]:
    """Each `python -m src.X ...` of a markdown file (code blocks and inline
    code), continuation lines joined and trailing comments dropped."""
    found = []
    for line in _joined(path.read_text(encoding="utf-8")).splitlines():
        for cmd in re.findall(r"python -m src\.[a-z]+[^`|]*", line):
            cmd = re.split(r"\s+#", cmd)[0].strip()
            if len(cmd.split()) > 3:  # a bare `python -m src.X` names, not runs
                found.append(cmd)
    return found


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = [(p.name, c) for p in DOCS for c in module_commands(p)]


def test_the_readme_shows_every_command():
    shown = {c.split()[2] for c in module_commands(ROOT / "README.md")}
    assert shown == set(PARSERS), sorted(set(PARSERS) ^ shown)


@pytest.mark.parametrize("where,command", COMMANDS)
def test_documented_command_parses(where, command):
    words = shlex.split(command)
    parser = importlib.import_module(PARSERS[words[2]]).build_parser()
    try:
        parser.parse_args(words[3:])
    except SystemExit as exc:
        if exc.code != 0:  # --help ends with 0
            pytest.fail(f"{where}: the command does not parse: {command}")


def test_quickstart_help_is_its_comment():
    proc = subprocess.run(
        ["bash", "scripts/quickstart.sh", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "--data" in proc.stdout, proc.stderr
    assert "set -e" not in proc.stdout and "#" not in proc.stdout.split("\n")[0]


def test_not_run_commands_are_run_elsewhere():
    """Each command the walkthrough skips names a test that exists."""
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                names.add(node.name)
    for command, test in NOT_RUN.items():
        assert test.startswith("(") or test in names, (command, test)


# ------------------------------------------------------------------ walkthrough


def shrink_config(path: Path) -> dict:
    """The config at `path`, resolved by the project's loader, with a tiny model
    and every step count ÷ SCALE (vocabulary, data paths and run name kept)."""
    from src.config import load_config

    cfg = dataclasses.asdict(load_config(path))
    m, t, e, c, log = (
        cfg[k] for k in ("model", "training", "eval", "checkpoint", "logging")
    )
    m.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, context_length=32)
    if m.get("ffn_dim"):
        m["ffn_dim"] = 64
    t.update(batch_size=2, grad_accum_steps=1)
    t["max_steps"] = max(1, t["max_steps"] // SCALE)
    t["warmup_steps"] = t["warmup_steps"] // SCALE
    for section in (e, c, log):
        if section.get("interval"):
            section["interval"] = max(1, section["interval"] // SCALE)
    e.update(
        max_tokens=min(e["max_tokens"], 256), sample_tokens=min(e["sample_tokens"], 8)
    )
    return cfg


def scaled(command: str) -> str:
    """`command` with its step counts ÷ SCALE, as the configs'."""
    command = re.sub(
        r"step_(\d{8})", lambda m: f"step_{int(m.group(1)) // SCALE:08d}", command
    )
    return re.sub(
        r"training\.max_steps=(\d+)",
        lambda m: f"training.max_steps={int(m.group(1)) // SCALE}",
        command,
    )


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    if not (SHARED / "tinystories_train.txt").exists():
        pytest.skip("needs ../shared/data/tinystories_train.txt")  # CI has it
    top = tmp_path_factory.mktemp("readme")
    (top / "shared").symlink_to(SHARED.parent)
    work = top / "repo"
    work.mkdir()
    for name in ("src", "scripts", "docs", "pyproject.toml", ".venv"):
        (work / name).symlink_to(ROOT / name)
    (work / "configs").mkdir()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        text = yaml.safe_dump(shrink_config(path), sort_keys=False)
        (work / "configs" / path.name).write_text(text, encoding="utf-8")
    raw = work / "data" / "raw"
    raw.mkdir(parents=True)
    with open(SHARED / "tinystories_train.txt", "rb") as f:
        head = f.read(1_500_000)
    head = head[: head.rindex(b"<|endoftext|>\n") + len(b"<|endoftext|>\n")]
    (raw / "tinystories_train.txt").write_bytes(head)
    return work


def walkthrough() -> list[tuple[str, str, str]]:
    """(language, command or code, comment) of the README, in order."""
    steps = []
    for lang, body in code_blocks(ROOT / "README.md"):
        if lang == "bash":
            steps += [("bash", c, comment) for c, comment in bash_commands(body)]
        elif lang == "python":
            steps.append(("python", body, ""))
    return steps


def _run_interrupted(command: str, cwd: Path, env: dict, checkpoints: Path) -> int:
    """Run `command`, SIGINT it once a checkpoint of its run is committed."""
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {command}"], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (checkpoints / "latest").exists():
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.mark.slow
def test_readme_walkthrough(sandbox):
    env = dict(os.environ)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("SLM_KERNELS", None)
    ran, took = 0, []
    for lang, command, comment in walkthrough():
        started = time.monotonic()
        if lang == "python":
            proc = subprocess.run(
                [sys.executable, "-c", command], cwd=sandbox, env=env,
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
            assert proc.stdout.strip(), f"{command}: printed nothing"
            ran += 1
            continue
        if command in NOT_RUN or "needs network" in comment:
            continue
        command = scaled(command)
        if "Ctrl-C" in comment:
            run = shlex.split(command)[shlex.split(command).index("--config") + 1]
            ckpts = sandbox / "checkpoints" / Path(run).stem
            code, out = _run_interrupted(command, sandbox, env, ckpts)
            assert code == 0 and "saved" in out, f"{command}\n{out[-3000:]}"
            ran += 1
            continue
        stdin = "Tell me a story\n/quit\n" if "--interactive" in command else ""
        proc = subprocess.run(
            ["bash", "-c", command], cwd=sandbox, env=env, input=stdin,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, (
            f"README command failed ({proc.returncode}): {command}\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
        ran += 1
        took.append((time.monotonic() - started, command))
    for seconds, command in sorted(took, reverse=True)[:8]:  # shown with -s
        print(f"{seconds:6.1f} s  {command[:90]}")
    assert ran >= 25, ran
    # what the commands were meant to make is there
    assert any((sandbox / "checkpoints/model_config_small").glob("rewound-*"))
    assert (sandbox / "checkpoints/small-lr3e-4/latest").exists()
    assert (sandbox / "results.jsonl").stat().st_size > 0
    assert (sandbox / "out/hf/config.json").exists()
    assert (sandbox / "out/hf/README.md").exists()  # the model card
    assert (sandbox / "out/quickstart.gguf").stat().st_size > 0
    assert (sandbox / "compare.png").stat().st_size > 0


def test_console_scripts_name_themselves():
    """Each console script of pyproject.toml runs its command, and --help and
    usage errors name the script, not `python -m src.X`."""
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"slm-train", "slm-chat", "slm-convert"} <= set(scripts)
    for name in scripts:
        exe = Path(sys.executable).parent / name
        assert exe.exists(), f"{name} is not installed: pip install -e ."
        proc = subprocess.run(
            [exe, "--help"], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: {name} "), proc.stdout[:200]
    proc = subprocess.run(
        [Path(sys.executable).parent / "slm-data", "prepare", "--no-such-option"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "slm-data prepare: error:" in proc.stderr
    assert "Traceback" not in proc.stderr
