"""The documents that promise behaviour name the tests that hold them to it:
every test named in docs/FAULTS.md exists, and every fault row names one."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _test_names() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names.add(node.name)
    return names


def test_every_fault_row_names_tests_that_exist():
    text = (ROOT / "docs" / "FAULTS.md").read_text(encoding="utf-8")
    rows = [
        line for line in text.splitlines() if re.match(r"\| [A-Z]\d+[a-z]? \|", line)
    ]
    assert len(rows) >= 40, "the fault tables lost rows"
    known = _test_names()
    for row in rows:
        named = re.findall(r"`(test_\w+)`", row)
        assert named, f"a fault row without a test: {row[:80]}"
        missing = [n for n in named if n not in known]
        assert not missing, f"{row.split('|')[1].strip()}: no such test {missing}"


@pytest.mark.parametrize("doc", ["README.md", "docs/training.md"])
def test_configs_tables_match_the_configs(doc):
    """Every configs/*.yaml has a row in the README's (and docs/training.md's)
    table, and the row's numbers (parameters, d / layers / heads (kv), context,
    vocab) are the config's."""
    from src.config import load_config

    text = (ROOT / doc).read_text(encoding="utf-8")
    rows = re.findall(r"^\| `configs/([\w-]+)\.yaml` \| (.+) \|$", text, re.M)
    assert rows, "the README lost its configs table"
    seen = set()
    for name, rest in rows:
        cells = [c.strip() for c in rest.split("|")]
        m = load_config(ROOT / "configs" / f"{name}.yaml").model
        kv = f" ({m.kv_heads})" if m.kv_heads != m.n_heads else ""
        shape = f"{m.d_model} / {m.n_layers} / {m.n_heads}{kv}"
        want = [f"{m.num_params() / 1e6:.1f}M", shape, str(m.context_length),
                str(m.vocab_size)]  # fmt: skip
        assert cells[:4] == want, f"configs/{name}.yaml: {doc} says {cells[:4]}"
        seen.add(name)
    presets = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert presets <= seen, f"configs without a row in {doc}: {sorted(presets - seen)}"
