"""The import graph is part of the design (STYLE.md habit 2), checked in one place.

Statically, from the source: no module imports another in a loop, and the
packages stay in their layers: the corpus readers stand on nothing but the error
classes and the chat template; the tokenizer and the token files know nothing of
MLX's model, training or generation; the model knows nothing of what trains or
runs it; a command line (`src.<package>.cli`) is imported by nobody but its
package's `__main__`. At run time: the data side loads neither MLX nor
torch, and the MLX path loads neither torch nor mlx-lm (whose package import loads
transformers and torch).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# package (or top-level module) -> the packages it may never import
LAYERS = {
    "errors": "*",
    "files": "* -errors",
    "cli": "* -errors",
    "config": "* -errors",
    "template": "* -errors",
    "corpus": "* -errors -template",
    "tokenizer": "data model train inference eval checkpoint convert backend",
    "data": "model train inference eval checkpoint convert backend",
    "backend": "model train inference eval checkpoint convert data corpus tokenizer",
    "model": "train inference eval checkpoint convert data corpus tokenizer",
    "inference": "train eval convert data corpus",
    "checkpoint": "train inference eval convert data corpus",
    "eval": "train inference convert",
    "convert": "train inference eval data corpus",
    "train": "convert",
    "plot": "* -config -errors -cli -files",
    "report": "* -config -errors -cli -files -plot",
}
UNITS = {
    "errors", "files", "cli", "config", "template", "corpus", "tokenizer", "data",
    "backend", "model", "inference", "checkpoint", "eval", "convert", "train",
    "plot", "report",
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}, from the source text."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[
                        : len(package.split(".")) - node.level + 1
                    ]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "src":
                    found.add(t)
        graph[name] = found
    return graph


def unit(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, m, n]))
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_packages_stay_in_their_layers():
    graph = import_graph()
    assert {unit(m) for m in graph if m != "src"} == UNITS, "a new package: add it"
    bad = []
    for m, targets in sorted(graph.items()):
        rule = LAYERS.get(unit(m), "").split()
        never = set(UNITS) if "*" in rule else set(rule)
        never -= {r[1:] for r in rule if r.startswith("-")} | {unit(m)}
        bad += [f"{m} -> {t}" for t in sorted(targets) if unit(t) in never]
    assert not bad, "imports across layers:\n" + "\n".join(bad)


def test_command_lines_are_leaves():
    """A command (`src.<package>.cli`) is imported only by its package's
    `__main__`, so library code never depends on a command line."""
    graph = import_graph()
    bad = [
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if t.endswith(".cli")
        and t != "src.cli"
        and m != t.rpartition(".")[0] + ".__main__"
    ]
    assert not bad, bad


def loaded_after(module: str) -> set[str]:
    code = (
        f"import sys, json, {module}; "
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    "module",
    ["src.config", "src.corpus.sources", "src.tokenizer.cli", "src.data.cli",
     "src.data.tokens", "src.plot", "src.report"],
)  # fmt: skip
def test_data_side_imports_no_framework(module):
    loaded = loaded_after(module)
    assert not loaded & {"mlx", "torch", "mlx_lm", "transformers"}, module


@pytest.mark.parametrize(
    "module",
    ["src.train.cli", "src.inference.cli", "src.inference.chat", "src.eval.cli",
     "src.convert.cli", "src.checkpoint.contents"],
)  # fmt: skip
def test_mlx_path_imports_no_torch(module):
    loaded = loaded_after(module)
    assert "mlx" in loaded
    assert not loaded & {"torch", "mlx_lm", "transformers"}, module
