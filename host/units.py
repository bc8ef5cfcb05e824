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
MAX_DURATION_S = 10 * 365.25 * _SECONDS["d"]
"""Durations beyond ten years are typing mistakes, and beyond about 292 years they
overflow the clocks and waits they reach (a ttl, a soak, a timeout)."""


def parse_duration(text: object, what: str, *, maximum: float = MAX_DURATION_S) -> float:
    """Seconds (> 0 and <= ``maximum``) from ``text``; an InputError that names ``what``
    (the option) and the text otherwise."""
    match = _DURATION.fullmatch(str(text).lower())
    if match is None or float(match[1]) <= 0:
        raise InputError(f"{what} {text!r}: expected a duration such as 90s, 5m, 2h or 7d")
    seconds = float(match[1]) * _SECONDS[match[2] or "s"]
    if seconds > maximum:
        raise InputError(f"{what} {text!r}: at most {show_duration(maximum)}")
    return seconds


def show_duration(seconds: float) -> str:
    """``3652.5d``, ``2h``, ``90s``: in the largest of days, hours, minutes and seconds
    that is at most ``seconds``."""
    for unit in ("d", "h", "m", "s"):
        if seconds >= _SECONDS[unit] or unit == "s":
            return f"{seconds / _SECONDS[unit]:g}{unit}"
    raise AssertionError("unreachable")


class Duration(click.ParamType):
    """``3s``, ``500ms``, ``2m``, ``1h`` or plain seconds, between 0 and ``maximum``."""

    name = "duration"

    def __init__(self, maximum: float = MAX_DURATION_S, minimum: float = 0.0) -> None:
        self.maximum, self.minimum = maximum, minimum

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            try:
                seconds = parse_duration(
                    value, param.opts[0] if param else "duration", maximum=math.inf
                )
            except InputError as exc:
                self.fail(str(exc), param, ctx)
        if not self.minimum <= seconds <= self.maximum:
            self.fail(
                f"must be between {show_duration(self.minimum)} and "
                f"{show_duration(self.maximum)}, got {value!r}",
                param,
                ctx,
            )
        return seconds


class FiniteFloat(click.FloatRange):
    """click's FloatRange without ``nan`` and ``inf`` (which compare false with every
    bound, so FloatRange lets ``nan`` through)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number
