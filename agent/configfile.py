"""YAML config loading whose errors name the file and line of the offending value."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slimfleet.agent.errors import ConfigError
from slimfleet.agent.store import FileTooLarge, read_bounded


@dataclass
class Node:
    """A parsed YAML value that remembers where it came from."""

    value: Any
    path: str
    line: int
    file: str
    key_line: int = 0
    """For a mapping value, the line of its key (a block value starts a line later)."""

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.path or '<root>'}"

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where()}: {message}")

    # -- mappings -----------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.as_mapping())

    def as_mapping(self) -> dict[str, Node]:
        if not isinstance(self.value, dict):
            raise self.error(f"expected a mapping, got {_kind(self.value)}")
        return self.value

    def get(self, key: str) -> Node | None:
        return self.as_mapping().get(key)

    def require(self, key: str) -> Node:
        node = self.get(key)
        if node is None:
            raise self.error(f"missing required key {key!r}")
        return node

    def reject_unknown(self, allowed: set[str]) -> None:
        for key, node in self.as_mapping().items():
            if key not in allowed:
                where = f"{node.file}:{node.key_line or node.line}: {node.path}"
                raise ConfigError(
                    f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})"
                )

    # -- sequences ----------------------------------------------------------------
    def items(self) -> Iterator[Node]:
        if not isinstance(self.value, list):
            raise self.error(f"expected a list, got {_kind(self.value)}")
        yield from self.value

    # -- scalars ------------------------------------------------------------------
    def scalar(self) -> Any:
        if isinstance(self.value, (dict, list)):
            raise self.error(f"expected a single value, got {_kind(self.value)}")
        return self.value

    def str(self) -> str:
        value = self.scalar()
        if not isinstance(value, str) or not value:
            raise self.error(f"expected a non-empty string, got {value!r}")
        if "\0" in value:  # no name or path holds one; the OS refuses it with a ValueError
            raise self.error("must not contain a NUL character")
        return value

    def int(self, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected an integer, got {value!r}")
        self._check_range(value, minimum, maximum)
        return value

    def float(self, minimum: float | None = None, maximum: float | None = None) -> float:
        """A finite number: ``.inf`` and ``.nan`` are refused."""
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise self.error(f"expected a finite number, got {value!r}")
        self._check_range(value, minimum, maximum)
        return float(value)

    def _check_range(self, value: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            raise self.error(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(f"must be <= {maximum}, got {value}")

    def bool(self) -> bool:
        value = self.scalar()
        if not isinstance(value, bool):
            raise self.error(f"expected true or false, got {value!r}")
        return value

    def check(self, predicate: Callable[[Any], bool], message: str) -> Any:
        value = self.scalar()
        if not predicate(value):
            raise self.error(message)
        return value

    def plain(self) -> Any:
        """The value with all position information stripped."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r}"


MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this is refused before parsing (real ones are a few KiB;
PyYAML's pure-Python parser needs about 50x the text in memory)."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists accepted."""
MAX_VALUES = 100_000
"""Most values a config may hold once its aliases are expanded: a "billion laughs" file
(anchors of anchors) expands exponentially and is refused at this count."""


def parse_yaml(text: str, file: str) -> Node:
    """Parse YAML text into a :class:`Node` tree; syntax errors become ConfigError, and so
    do nesting deeper than :data:`MAX_DEPTH`, more than :data:`MAX_VALUES` values after
    alias expansion, an alias inside itself, and a mapping key that is not a single value."""
    try:
        _check_depth(text, file)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context_mark", None)
        if context is not None and context.line + 1 != line:
            problem += f" ({getattr(exc, 'context', 'started')} at line {context.line + 1})"
        raise ConfigError(f"{file}:{line}: invalid YAML: {problem}") from None
    if root is None:
        raise ConfigError(f"{file}:1: the file is empty")
    return _Converter(file).convert(root, "")


def _check_depth(text: str, file: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH from the event stream (which, unlike the
    composer, does not recurse), at the line where it goes too deep."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1
                raise ConfigError(f"{file}:{line}: nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


class _Converter:
    """Turns a composed YAML node graph into :class:`Node` trees, counting values (an alias
    is converted again wherever it is used) and refusing an alias used inside itself."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.values = 0
        self.open: set[int] = set()
        """ids of the nodes being converted: an alias to one of them is a cycle."""

    def convert(self, node: yaml.Node, path: str, key_line: int = 0, depth: int = 0) -> Node:
        file, line = self.file, node.start_mark.line + 1
        if depth > MAX_DEPTH:  # aliases nest too: the file's own nesting was checked before
            raise ConfigError(f"{file}:{line}: nested deeper than {MAX_DEPTH} levels")
        self.values += 1
        if self.values > MAX_VALUES:
            raise ConfigError(
                f"{file}:{line}: more than {MAX_VALUES} values once aliases are expanded"
            )
        if id(node) in self.open:
            raise ConfigError(f"{file}:{line}: {path or '<root>'}: an alias refers to itself")
        if isinstance(node, yaml.ScalarNode):
            value = yaml.SafeLoader(  # resolve the scalar's type exactly as safe_load would
                ""
            ).construct_object(node, deep=True)
            return Node(value, path, line, file, key_line)
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return Node(self._mapping(node, path, depth), path, line, file, key_line)
            items = [
                self.convert(v, f"{path}[{i}]", depth=depth + 1) for i, v in enumerate(node.value)
            ]
            return Node(items, path, line, file, key_line)
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: str, depth: int) -> dict[str, Node]:
        mapping: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(f"{self.file}:{key_line}: a key must be a single value")
            key = key_node.value
            if key in mapping:
                raise ConfigError(f"{self.file}:{key_line}: duplicate key {key!r}")
            child = f"{path}.{key}" if path else str(key)
            mapping[key] = self.convert(value_node, child, key_line, depth + 1)
        return mapping


def load_yaml(path: str | Path) -> Node:
    """Read and parse a YAML config file."""
    path = Path(path)
    try:
        text = read_bounded(path, MAX_CONFIG_BYTES).decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config is not UTF-8 text") from None
    except FileTooLarge:
        raise ConfigError(f"{path}: config is larger than {MAX_CONFIG_BYTES >> 10} KiB") from None
    except ValueError as exc:  # not a regular file
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    return parse_yaml(text, str(path))
