"""Durations and numbers as people type them in options: one parser for every command.

``500ms``, ``90s``, ``5m`` (or ``5min``), ``2h``, ``7d``, ``2w`` or plain seconds; numbers
are finite (``nan`` and ``inf``, which Python's ``float`` accepts, are refused).
"""

from __future__ import annotations

import math
import re
from typing import Any

import click

from slimfleet.agent.errors import InputError

_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|min|m|h|d|w)?\s*")
_SECONDS = {"ms": 0.001, "s": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SECONDS["w"] = 7 * _SECONDS["d"]


def parse_duration(text: object, what: str, *, maximum: float | None = None) -> float:
    """Seconds (> 0, and <= ``maximum`` when given) from ``text``; an InputError that names
    ``what`` (the option) and the text otherwise."""
    match = _DURATION.fullmatch(str(text).lower())
    if match is None or float(match[1]) <= 0:
        raise InputError(f"{what} {text!r}: expected a duration such as 90s, 5m, 2h or 7d")
    seconds = float(match[1]) * _SECONDS[match[2] or "s"]
    if maximum is not None and seconds > maximum:
        raise InputError(f"{what} {text!r}: at most {maximum:g} seconds")
    return seconds


class Duration(click.ParamType):
    """``3s``, ``500ms``, ``2m``, ``1h`` or plain seconds, between 0 and ``maximum``."""

    name = "duration"

    def __init__(self, maximum: float | None = None, minimum: float = 0.0) -> None:
        self.maximum, self.minimum = maximum, minimum

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            try:
                seconds = parse_duration(value, param.opts[0] if param else "duration")
            except InputError as exc:
                self.fail(str(exc), param, ctx)
        if seconds < self.minimum or (self.maximum is not None and seconds > self.maximum):
            upper = f" and {self.maximum:g}s" if self.maximum is not None else ""
            self.fail(f"must be between {self.minimum:g}s{upper}, got {value!r}", param, ctx)
        return seconds


class FiniteFloat(click.FloatRange):
    """click's FloatRange without ``nan`` and ``inf`` (which compare false with every
    bound, so FloatRange lets ``nan`` through)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number
