"""Recipes: named sequences of passes that the search tries as candidates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimfleet.agent.errors import InputError


@dataclass(frozen=True)
class Step:
    """One pass with its options."""

    pass_name: str
    options: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        if not self.options:
            return self.pass_name
        opts = ",".join(f"{k}={_show(v)}" for k, v in sorted(self.options.items()))
        return f"{self.pass_name}[{opts}]"


def _show(value: Any) -> str:
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


@dataclass(frozen=True)
class Recipe:
    """A candidate the search builds: passes applied in order to the original model."""

    name: str
    steps: tuple[Step, ...]
    description: str = ""
    lossy: bool = True
    """False when every step is lossless (the result must match the original)."""

    def label(self) -> str:
        return " > ".join(s.label() for s in self.steps) or "(original)"

    def passes_text(self) -> str:
        """The ``--passes`` text that runs this recipe (:func:`parse_recipe` reads it back)."""
        return ",".join(s.label() for s in self.steps)


def parse_recipe(text: str) -> Recipe:
    """Parse ``--passes`` text: ``simplify,quantize_dynamic[op_types=MatMul+LSTM]``."""
    steps = []
    parts = [part.strip() for part in _split_top_level(text)]
    if not any(parts):
        raise InputError("--passes: no pass given")
    for part in parts:
        if not part:
            raise InputError(f"--passes {text!r}: an empty item (two commas in a row?)")
        name, bracket, rest = part.partition("[")
        options: dict[str, Any] = {}
        if not name.strip() or "]" in name:
            raise InputError(f"--passes: expected NAME or NAME[key=value,...], got {part!r}")
        if bracket:
            if not rest.endswith("]") or "[" in rest or "]" in rest[:-1]:
                raise InputError(f"--passes: missing ']' in {part!r}")
            for item in rest[:-1].split(",") if rest != "]" else []:
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise InputError(f"--passes: expected key=value in {part!r}, got {item!r}")
                options[key.strip()] = value.strip()
        steps.append(Step(name.strip(), options))
    return Recipe("custom", tuple(steps), "the recipe given with --passes")


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts
