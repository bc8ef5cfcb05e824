"""Samples for calibration and evaluation: user data through the data hook, or random inputs.

Calibration and evaluation samples never overlap, so a static quantizer is never judged
on the samples it was calibrated with. The split is deterministic (seeded shuffle).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimfleet.agent.errors import InputError
from slimfleet.host.passes import Feed

log = logging.getLogger(__name__)

SPLIT_SEED = 0
MAX_EVALUATION = 32
"""Evaluation samples used at most (each candidate runs all of them)."""
MAX_CALIBRATION = 64
RANDOM_SAMPLES = 16

InputSpec = Mapping[str, Any]
"""One model input: ``{"name", "dtype", "shape"}`` as in :func:`modelfile.io_signature`."""


@dataclass
class Samples:
    """The samples a search uses, and where they came from."""

    calibration: list[Feed]
    evaluation: list[Feed]
    source: str
    """The data path, or ``"random"``."""
    warnings: list[str] = field(default_factory=list)


def show_shape(shape: Sequence[Any] | None) -> str:
    """``[1, 3, "width"]`` -> ``"1x3xwidth"`` (dynamic dims without a name show as ``?``)."""
    if shape is None:
        return "?"
    return "x".join(str(d) if d not in (None, "") else "?" for d in shape) or "scalar"


def _fits(shape: Sequence[int], expected: Sequence[Any] | None) -> bool:
    if expected is None:
        return True
    return len(shape) == len(expected) and all(
        not isinstance(e, int) or e == s for s, e in zip(shape, expected, strict=True)
    )


def check_keys(keys: Iterable[str], inputs: Sequence[InputSpec], where: str) -> None:
    """Raise InputError unless ``keys`` are exactly the model's input names."""
    keys = set(keys)
    names = [spec["name"] for spec in inputs]
    missing = [n for n in names if n not in keys]
    extra = sorted(keys - set(names))
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            problems.append(f"unexpected {', '.join(map(repr, extra))}")
        raise InputError(
            f"{where}: keys do not match the model inputs {names} ({'; '.join(problems)})"
        )


def check_feed(feed: Mapping[str, Any], inputs: Sequence[InputSpec], where: str) -> None:
    """Raise InputError unless ``feed`` has exactly the model's inputs with fitting arrays."""
    check_keys(feed, inputs, where)
    for spec in inputs:
        array = feed[spec["name"]]
        if not isinstance(array, np.ndarray):
            raise InputError(f"{where}: input {spec['name']!r} is not an array")
        dtype_ok = array.dtype.name == spec["dtype"]
        if not dtype_ok or not _fits(array.shape, spec["shape"]):
            raise InputError(
                f"{where}: input {spec['name']!r} expects {spec['dtype']} "
                f"{show_shape(spec['shape'])}, got {array.dtype.name} {show_shape(array.shape)}"
            )


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``--input-shape name:1x3x224x224``."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or min(shape) < 1:
        raise InputError(f"--input-shape {text!r}: expected NAME:DIMxDIM..., e.g. x:1x3x224x224")
    return name, shape


def _random_shape(spec: InputSpec, given: tuple[int, ...] | None) -> tuple[int, ...]:
    expected = spec["shape"]
    if given is not None:
        if not _fits(given, expected):
            raise InputError(
                f"--input-shape {spec['name']}:{show_shape(given)} does not fit the model's "
                f"{show_shape(expected)}"
            )
        return given
    if expected is None or not all(isinstance(d, int) for d in expected):
        example = show_shape([d if isinstance(d, int) else f"<{d or 'N'}>" for d in expected or []])
        raise InputError(
            f"input {spec['name']!r} has dynamic dims ({show_shape(expected)}): without --data, "
            f"give its shape with --input-shape {spec['name']}:{example}"
        )
    return tuple(expected)


def random_feeds(
    inputs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]], count: int
) -> list[Feed]:
    """``count`` random samples: floats uniform in [0, 1), integers and bools 0 or 1."""
    rng = np.random.default_rng(SPLIT_SEED)
    resolved = {spec["name"]: _random_shape(spec, shapes.get(spec["name"])) for spec in inputs}
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in inputs:
            dtype, shape = np.dtype(spec["dtype"]), resolved[spec["name"]]
            if dtype.kind == "f":
                feed[spec["name"]] = rng.random(shape).astype(dtype)
            elif dtype.kind in "iub":
                feed[spec["name"]] = rng.integers(0, 2, shape).astype(dtype)
            else:
                raise InputError(
                    f"input {spec['name']!r} is {dtype.name}: random inputs cannot be made, "
                    "give --data"
                )
        feeds.append(feed)
    return feeds


def split(
    feeds: Sequence[Feed],
    max_evaluation: int = MAX_EVALUATION,
    max_calibration: int = MAX_CALIBRATION,
) -> tuple[list[Feed], list[Feed]]:
    """Disjoint ``(calibration, evaluation)`` lists from a seeded shuffle.

    Half the samples (at most ``max_evaluation``) evaluate; the rest calibrate. A
    single sample only evaluates.
    """
    order = np.random.default_rng(SPLIT_SEED).permutation(len(feeds))
    n_eval = min(max_evaluation, math.ceil(len(feeds) / 2))
    evaluation = [feeds[i] for i in order[:n_eval]]
    calibration = [feeds[i] for i in order[n_eval:][:max_calibration]]
    return calibration, evaluation


def load_samples(
    hook: Any,
    data: Path | str | None,
    inputs: Sequence[InputSpec],
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    max_evaluation: int = MAX_EVALUATION,
) -> Samples:
    """Samples from ``data`` via ``slimfleet_load_data``, or random ones with a warning.

    ``hook`` is a plugin manager's ``pm.hook``. Every feed a plugin returns is checked
    against ``inputs``; ``input_shapes`` (``--input-shape``) sizes random inputs.
    """
    shapes = dict(input_shapes or {})
    known = [spec["name"] for spec in inputs]
    for name in shapes:
        if name not in known:
            raise InputError(f"--input-shape {name!r}: the model has no such input ({known})")
    warnings: list[str] = []
    if data is None:
        feeds = random_feeds(inputs, shapes, RANDOM_SAMPLES)
        warnings.append(
            "no --data given: candidates are judged on RANDOM inputs, so fidelity figures "
            "say little about real accuracy; pass --data samples.npz"
        )
        source = "random"
    else:
        path = Path(data)
        if not path.exists():
            raise InputError(f"--data {path}: no such file or directory")
        loaded = hook.slimfleet_load_data(path=path, inputs=[dict(s) for s in inputs])
        if loaded is None:
            raise InputError(
                f"--data {path}: no data plugin reads this (built in: a .npz file or a "
                "directory of .npz files)"
            )
        feeds = list(loaded)
        if not feeds:
            raise InputError(f"--data {path}: holds no samples")
        for i, feed in enumerate(feeds):
            check_feed(feed, inputs, f"{path} sample {i}")
        if shapes:
            warnings.append("--input-shape only sizes random inputs; ignored with --data")
        source = str(path)
    calibration, evaluation = split(feeds, max_evaluation)
    if not calibration:
        warnings.append("only one sample: it is used for evaluation, none for calibration")
    for text in warnings:
        log.warning(text)
    return Samples(calibration, evaluation, source, warnings)
