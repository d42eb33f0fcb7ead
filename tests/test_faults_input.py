"""Hostile input through the real commands (issue 15, items 9, 10, 11, 12 and 19).

Every mistake in a config file, a `--set` override or a tokenizer command ends in
one `error:` line naming what is wrong and exit status 2, with no traceback, and
before anything is written. Each case runs `python -m src.X` in a subprocess: an
exception class seen as `__main__.X` there is not the `src.X` an in-process
`main([...])` test sees. Arguments may be bytes (invalid UTF-8 as a shell passes it).
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src import cli
from src.config import Config, ConfigError, config_from_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def run(module: str, *args: str | bytes | Path, stdin: bytes = b"", timeout=60):
    """`python -m module args` from the repository root; stderr as text."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(_arg, args)],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    return proc


def _arg(a: str | bytes | Path) -> str | bytes:
    return str(a) if isinstance(a, Path) else a


def error_line(proc, *needles: str) -> str:
    """The one `error:` line of a user mistake (exit 2, no traceback), holding
    every needle."""
    err = proc.stderr
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def train(tmp_path: Path, config: str | Path | bytes, *sets: str | bytes):
    """The real training command on `config` with `--set`s, checkpoints and logs
    under tmp_path/out (which a refused config must leave absent)."""
    out = tmp_path / "out"
    args = ["--config", config]
    for s in (f"checkpoint.dir={out}/ck", f"logging.dir={out}/logs", *sets):
        args += ["--set", s]
    return run("src.train", *args)


def write(tmp_path: Path, text: str | bytes, name="c.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ------------------------------------------------- item 9: the tokenizer CLI


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, story_corpus) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    files = {
        "empty.txt": b"",
        "blank.txt": b"  \n\t\n \n",
        "latin1.txt": "caf\xe9 au lait\n".encode("latin-1") * 20,
        "binary.bin": bytes(range(256)) * 40,
        "a_file": b"x",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {"dir": d, "corpus": story_corpus(20_000)}


TOKENIZER_CASES = {
    # name: (argv with {dir}, {corpus}, {tok} placeholders, what the error says)
    "empty": ("train --input {dir}/empty.txt --vocab-size 300", "corpus is empty"),
    "blank": ("train --input {dir}/blank.txt --vocab-size 300", "only whitespace"),
    "vocab10": ("train --input {corpus} --vocab-size 10", "minimum is 265"),
    "vocab10M": ("train --input {corpus} --vocab-size 10000000", "maximum is"),
    "vocab_int64": ("train --input {corpus} --vocab-size 99999999999", "maximum is"),
    "binary": ("train --input {dir}/binary.bin --vocab-size 300", "binary.bin"),
    "latin1": ("train --input {dir}/latin1.txt --vocab-size 300", "not UTF-8"),
    "missing": ("train --input {dir}/none.txt --vocab-size 300", "none.txt"),
    "coverage": (
        "train --input {corpus} --vocab-size 300 --character-coverage 0.5",
        "--character-coverage",
    ),
    "seed": ("train --input {corpus} --vocab-size 300 --seed -1", "--seed"),
    "sentences": (
        "train --input {corpus} --vocab-size 300 --max-sentences 99999999999999999999",
        "--max-sentences",
    ),
    "stats_latin1": ("stats --tokenizer {tok} --input {dir}/latin1.txt", "not UTF-8"),
    "stats_binary": ("stats --tokenizer {tok} --input {dir}/binary.bin", "binary.bin"),
    "stats_missing": ("stats --tokenizer {tok} --input {dir}/none.txt", "none.txt"),
    "no_tokenizer": ("stats --tokenizer {dir}/none --input {corpus}", "no tokenizer"),
    "not_a_model": ("encode --tokenizer {dir}/a_file --text x", "not a sentencepiece"),
    "bad_id": ("decode --tokenizer {tok} --ids 99999", "token id 99999"),
}


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_item9_tokenizer_errors_exit_2(case, inputs, tok_dir, tmp_path):
    argv, needle = TOKENIZER_CASES[case]
    argv = argv.format(dir=inputs["dir"], corpus=inputs["corpus"], tok=tok_dir)
    out = tmp_path / "tok"
    if argv.startswith("train"):
        argv += f" --output {out}"
    error_line(run("src.tokenizer", *argv.split()), needle)
    assert not out.exists()


@pytest.mark.parametrize("output", ["a_file", "a_file/sub"])
def test_item9_tokenizer_output_not_a_folder(output, inputs):
    """Refused at once, naming the file in the way, not after reading and
    training (and not as a bare `[Errno 20]`)."""
    proc = run(
        "src.tokenizer", "train", "--input", inputs["corpus"],
        "--output", inputs["dir"] / output, "--vocab-size", "300",
    )  # fmt: skip
    error_line(proc, "a_file", "is not a folder")
    assert "training" not in proc.stderr
    assert (inputs["dir"] / "a_file").read_bytes() == b"x"


# ------------------------------------------- item 12: invalid UTF-8 coming in


def test_item12_encode_text_invalid_utf8_in_argv(tok_dir):
    proc = run(
        "src.tokenizer", "encode", "--tokenizer", tok_dir, b"--text", b"ok \xff\xfe"
    )
    error_line(proc, "--text", "not valid UTF-8", "0xff")
    assert proc.stdout == b""


def test_item12_encode_stdin_invalid_utf8(tok_dir):
    proc = run("src.tokenizer", "encode", "--tokenizer", tok_dir, stdin=b"a\xffb")
    error_line(proc, "stdin", "not UTF-8", "0xff")
    ok = run("src.tokenizer", "encode", "--tokenizer", tok_dir, stdin=b"caf\xc3\xa9")
    assert ok.returncode == 0 and ok.stdout.split(), ok.stderr


def test_item12_tokenizer_library_names_the_bad_text(tok_dir):
    """Every caller of Tokenizer.encode (prompts, the REPL, prepare) gets a
    TokenizerError, a user error, not sentencepiece's RuntimeError."""
    from src.errors import TokenizerError
    from src.tokenizer.spm import Tokenizer

    tok = Tokenizer.load(tok_dir)
    bad = b"hi \xff".decode("utf-8", "surrogateescape")
    for call in (lambda: tok.encode(bad), lambda: tok.encode_batch(["ok", bad])):
        with pytest.raises(TokenizerError, match="not valid UTF-8"):
            call()
    with pytest.raises(TokenizerError, match="not valid UTF-8"):
        tok.encode("\u2581" + bad)  # the path that splits on the space marker


@pytest.mark.parametrize(
    "sets, needle",
    [
        ([b'eval.sample_prompts=["ok", "\xff"]'], "not valid UTF-8"),
        ([b"run_name=a\xffb"], "not valid UTF-8"),
        ([b"data.train_path=/tmp/\xfe/train.bin"], "not valid UTF-8"),
    ],
)
def test_item12_set_with_invalid_utf8(tmp_path, sets, needle):
    error_line(train(tmp_path, TINY, *sets), "--set", needle)
    assert not (tmp_path / "out").exists()


def test_item12_config_strings_invalid_utf8(tmp_path):
    # YAML's "\udcff" escape makes the same lone surrogate a bad byte of argv makes
    path = write(tmp_path, 'eval:\n  sample_prompts: ["ok", "\\udcff"]\n')
    error_line(train(tmp_path, path), "eval.sample_prompts[1]", "not valid UTF-8")
    # the run name comes from the file name when the file has none
    name = bytes(tmp_path / "run") + b"\xff.yaml"
    Path(name.decode("utf-8", "surrogateescape")).write_text("model: {}\n")
    error_line(train(tmp_path, name), "run_name", "not valid UTF-8")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------ item 10: hostile YAML


def test_item10_repeated_key_names_both_lines(tmp_path):
    path = write(
        tmp_path,
        "training:\n  max_steps: 5\nmodel:\n  d_model: 64\ntraining:\n  seed: 1\n",
    )
    error_line(train(tmp_path, path), "c.yaml:5:1", "'training'", "lines 1 and 5")
    path = write(tmp_path, "model:\n  d_model: 64\n  n_heads: 4\n  d_model: 32\n")
    error_line(train(tmp_path, path), "'d_model'", "lines 2 and 4")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model: {}\n1: x\n", "key 1 is not a string"),
        ("model:\n  true: 1\n", "key true is not a string"),
        ("? [a, b]\n: 1\nmodel: {}\n", "is not a string"),
    ],
)
def test_item10_key_that_is_not_a_string(tmp_path, text, needle):
    error_line(train(tmp_path, write(tmp_path, text)), "c.yaml:", needle)


def test_item10_alias_bomb_refused_at_once(tmp_path):
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi"):
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    assert len(text) < 500  # ~9**9 strings once expanded
    start = time.perf_counter()
    proc = train(tmp_path, write(tmp_path, text))
    assert time.perf_counter() - start < 20
    error_line(proc, "c.yaml:2:", "aliases are not allowed")
    # an anchor and alias inside a --set value too
    error_line(train(tmp_path, TINY, "eval.sample_prompts=[&x a, *x]"), "alias")


@pytest.mark.parametrize(
    "text, needle",
    [
        ('run_name: "a\\0b"\nmodel: {}\n', "NUL"),
        ("run_name: a/b\nmodel: {}\n", "folder name"),
        ("run_name: ..\nmodel: {}\n", "folder name"),
        ('run_name: "a\\nb"\nmodel: {}\n', "control characters"),
        ("run_name: 'a\\b'\nmodel: {}\n", "folder name"),
        ("data:\n  train_path: ''\n", "must not be empty"),
    ],
)
def test_item10_run_name_and_paths(tmp_path, text, needle):
    error_line(train(tmp_path, write(tmp_path, text)), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"model:\n  d_model: \xff\n", "not UTF-8 text (byte 0xff at offset 18)"),
        (b"model:\n  d_model: [64\n", "c.yaml:3:1: invalid YAML"),
        (b"model: {d_model: 64\n", "c.yaml:2:1: invalid YAML"),
        (b"a: 1\n\x00\n", "c.yaml:2:1: invalid YAML"),
        (b"- model\n- data\n", "got a list"),
        (b"just words\n", "expected a mapping of sections"),
        (b"[" * 10_000, "nested more than"),
        (b"training:\n  seed: " + b"9" * 5000 + b"\n", "c.yaml"),
    ],
)
def test_item10_unreadable_config_files(tmp_path, content, needle):
    error_line(train(tmp_path, write(tmp_path, content)), needle)


def test_item10_config_that_is_not_a_file(tmp_path):
    error_line(train(tmp_path, tmp_path), "is a folder")
    big = tmp_path / "big.yaml"  # as /dev/zero would be, but bounded if read whole
    with open(big, "wb") as f:
        f.truncate(2 << 20)
    error_line(train(tmp_path, big), "big.yaml", "larger than")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("training=1", "'training' is a section"),
        ("training={}", "'training' is a section"),  # would drop the file's keys
        ("model=0", "'model' is a section"),
        ("a.b.c=..", "unknown key 'a'"),
        ("training.seed.x=1", "'training.seed' is not a section"),
        ("eval.sample_prompts={a: 1, a: 2}", "appears twice"),
        ("run_name=..", "folder name"),
        ("training.learnig_rate=1", "unknown key 'training.learnig_rate'"),
    ],
)
def test_item10_hostile_set(tmp_path, override, needle):
    error_line(train(tmp_path, TINY, override), needle)
    assert not (tmp_path / "out").exists()


def test_item10_repeated_set_last_wins(tmp_path):
    proc = run(
        "src.train", "--config", TINY, "--set", "training.seed=1",
        "--set", "training.seed=7", "--show-config",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert b"seed: 7\n" in proc.stdout


# ------------------------------------ item 11: numbers that poison the run


@pytest.mark.parametrize(
    "override",
    [
        "training.seed=-1",
        f"training.seed={2**70}",
        "training.max_steps=1e100",
        "training.time_budget_minutes=inf",
        "training.learning_rate=inf",
        "model.init_std=inf",
        "model.rope_theta=inf",
        "training.weight_decay=inf",
        "model.norm_eps=inf",
        "training.learning_rate=.nan",
        "eval.temperature=1e-300",  # 1 / temperature overflows: NaN samples
        "training.max_steps=true",
        "model.vocab_size=1.0e400",
    ],
)
def test_item11_numbers_checked_before_anything(tmp_path, override):
    key, value = override.split("=")
    error_line(train(tmp_path, TINY, override), f"{key}=")
    assert not (tmp_path / "out").exists()


def test_item11_bool_is_not_an_int_in_a_file(tmp_path):
    path = write(tmp_path, "model: {}\ntraining:\n  max_steps: true\n")
    error_line(train(tmp_path, path), "training.max_steps=True", "integer")


def _numeric_fields(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numeric_fields(value, f"{prefix}{f.name}.")
        elif f.type in ("int", "float", "int | None"):
            yield f"{prefix}{f.name}", f.type


@pytest.mark.parametrize("key, kind", list(_numeric_fields(Config())))
def test_item11_every_number_has_a_finite_range(key, kind):
    """One rule per field: each number refuses inf, nan, a bool and absurd sizes at
    both ends, naming the key (a new field without a rule fails here)."""
    bad = ["inf", "-inf", ".nan", "true", "1e30", "-1e30", str(2**64)]
    for value in bad:
        with pytest.raises(ConfigError, match=f"^{key}="):
            config_from_dict({}, [f"{key}={value}"])


def test_item11_argparse_types_refuse_non_finite_and_absurd():
    for parse in (cli.positive_int, cli.count, cli.int_in(0, 10)):
        for text in ("inf", "nan", "1e3", "-1", str(2**63), "9" * 5000, "", "x"):
            with pytest.raises(Exception, match="expected"):
                parse(text)
        assert parse("7") == 7
    for parse in (cli.positive_number, cli.number_in(0, 1)):
        for text in ("inf", "-inf", "nan", "1e999", "-1", "2e9", "x"):
            with pytest.raises(Exception, match="expected"):
                parse(text)
        assert parse("0.5") == 0.5
    assert math.isfinite(cli.MAX_NUMBER)


# ---------------------------------------------------- item 19: empty configs


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "the config is empty"),
        ("# all commented out\n#model:\n", "the config is empty"),
        ("{}\n", "the config is empty"),
        ("model: 0\n", "section 'model' must be a mapping"),
        ("model:\ndata:\n  train_path: x\n", "section 'model' must be a mapping"),
        ("model: {}\ntraining: [1, 2]\n", "section 'training' must be a mapping"),
    ],
)
def test_item19_empty_config_or_section(tmp_path, text, needle):
    """Not the 175M-parameter default model on the default data."""
    error_line(train(tmp_path, write(tmp_path, text)), "c.yaml", needle)
    assert not (tmp_path / "out").exists()
