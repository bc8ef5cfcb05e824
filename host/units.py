"""Durations as people type them in options: one parser for every command.

``500ms``, ``90s``, ``5m`` (or ``5min``), ``2h``, ``7d``, ``2w`` or plain seconds.
"""

from __future__ import annotations

import re

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
