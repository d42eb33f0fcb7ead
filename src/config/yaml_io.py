"""Reading and writing config YAML: a safe loader that refuses aliases, repeated
and non-string keys and deep nesting, one-line errors with line and column, and
the dumper of resolved configs."""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import ConfigError
from .rules import MAX_DEPTH
from .schema import Config


class YAMLRefused(yaml.MarkedYAMLError):
    """YAML that is valid but has no place in a config (see `_Loader`)."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what a config never needs and a hostile file
    abuses: aliases (a few hundred bytes of nested aliases expand to gigabytes),
    a key repeated in a mapping (PyYAML keeps the last one silently), keys that
    are not strings, and deep nesting (the composer recurses)."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise YAMLRefused(
                problem=f"alias *{event.anchor}: aliases are not allowed in a config",
                problem_mark=event.start_mark,
            )
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YAMLRefused(
                problem=f"nested more than {MAX_DEPTH} levels deep",
                problem_mark=event.start_mark,
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict[str, int] = {}
            for key_node, _ in node.value:
                line = key_node.start_mark.line + 1
                if key_node.tag != "tag:yaml.org,2002:str":
                    kind = key_node.tag.rpartition(":")[2]  # int, bool, null, seq...
                    shown = key_node.value if kind not in ("seq", "map") else "[...]"
                    raise YAMLRefused(
                        problem=f"the key {shown} is not a string (YAML reads it as {kind}; "
                        "quote it)",
                        problem_mark=key_node.start_mark,
                    )
                if key_node.value in seen:
                    raise YAMLRefused(
                        problem=f"the key {key_node.value!r} appears twice, on lines "
                        f"{seen[key_node.value]} and {line}",
                        problem_mark=key_node.start_mark,
                    )
                seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """The value of a YAML document, read by `_Loader`; yaml.YAMLError if invalid."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_error(where: str, text: str, exc: Exception) -> ConfigError:
    """One line, `where:line:col: invalid YAML: problem`, from a PyYAML error."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML forbids
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        problem = f"{exc.reason}: #x{exc.character:04x}"
    elif isinstance(exc, yaml.MarkedYAMLError):
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problem = "; ".join(filter(None, (exc.context, exc.problem)))
    else:  # e.g. ValueError: an integer of more than 4300 digits
        line, column, problem = 0, 0, str(exc)
    at = f"{where}:{line}:{column}" if line else where
    return ConfigError(f"{at}: invalid YAML: {' '.join(problem.split())}")


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:
        return True  # a saved config must load again, and `_Loader` refuses aliases


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (what is saved with checkpoints and logs)."""
    return yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False)
