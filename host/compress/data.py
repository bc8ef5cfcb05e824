"""Samples for calibration and evaluation: user data through the data hook, or random inputs.

The split (seeded shuffle, so deterministic): calibration takes half the samples, at most
:data:`MAX_CALIBRATION`; evaluation takes every other sample, however many. The two never
overlap, so a static quantizer is never judged on the samples it was calibrated with,
and every sample a calibrator does not need narrows the fidelity interval. A single
sample only evaluates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimfleet.agent.errors import InputError
from slimfleet.host.feeds import InputSpec, conform_feed, fits, fixed, show_shape
from slimfleet.host.passes import Feed

log = logging.getLogger(__name__)

SPLIT_SEED = 0
MAX_CALIBRATION = 64
"""Calibration samples used at most; the rest all evaluate."""
RANDOM_SAMPLES = 16
RANDOM_BYTES = 1 << 30
"""Most memory the random samples may take together (a model may declare an input of
10^10 elements); past it, --input-shape or --data is asked for."""


@dataclass
class Samples:
    """The samples a search uses, and where they came from."""

    calibration: list[Feed]
    evaluation: list[Feed]
    source: str
    """The data path, or ``"random"``."""
    warnings: list[str] = field(default_factory=list)


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
        if not fits(given, expected):
            raise InputError(
                f"--input-shape {spec['name']}:{show_shape(given)} does not fit the model's "
                f"{show_shape(expected)}"
            )
        return given
    if expected is None or not all(fixed(d) for d in expected):
        example = show_shape([d if fixed(d) else f"<{d or 'N'}>" for d in expected or []])
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
    per_sample = sum(math.prod(resolved[s["name"]]) * np.dtype(s["dtype"]).itemsize for s in inputs)
    if per_sample * count > RANDOM_BYTES:
        name, shape = max(resolved.items(), key=lambda item: math.prod(item[1]))
        raise InputError(
            f"input {name!r} {show_shape(shape)}: {count} random samples would take "
            f"{per_sample * count / 2**30:.1f} GiB (at most {RANDOM_BYTES >> 30} GiB): give a "
            f"smaller --input-shape {name}:... or --data"
        )
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in inputs:
            dtype, shape = np.dtype(spec["dtype"]), resolved[spec["name"]]
            if dtype.kind == "f":
                feed[spec["name"]] = rng.random(shape).astype(dtype)
            else:  # check_feedable: b, i or u
                feed[spec["name"]] = rng.integers(0, 2, shape).astype(dtype)
        feeds.append(feed)
    return feeds


def _finite(feed: Feed) -> bool:
    return all(np.isfinite(a).all() for a in feed.values() if a.dtype.kind == "f")


def check_feedable(inputs: Sequence[InputSpec]) -> None:
    """InputError unless every input is a tensor onnxruntime's Python API can be fed:
    numeric or bool (string, bfloat16 and float8 arrays, sequences, maps and optionals
    cannot be passed from numpy)."""
    for spec in inputs:
        name, dtype = spec["name"], spec["dtype"]
        if spec["shape"] is None and "(" in str(dtype):
            raise InputError(
                f"input {name!r} is of type {dtype}, not a tensor: slimfleet feeds tensor inputs only"
            )
        try:
            kind = np.dtype(dtype).kind
        except TypeError:
            kind = "?"
        if kind in "OUS":
            raise InputError(
                f"input {name!r} holds strings: slimfleet feeds numeric and bool inputs only"
            )
        if kind not in "biuf":
            raise InputError(
                f"input {name!r} is {dtype}: onnxruntime's Python API cannot be fed it from "
                "numpy, so slimfleet cannot run this model (numeric and bool inputs only)"
            )


def split(
    feeds: Sequence[Feed], max_calibration: int = MAX_CALIBRATION
) -> tuple[list[Feed], list[Feed]]:
    """Disjoint ``(calibration, evaluation)`` lists from a seeded shuffle.

    Calibration gets half the samples (rounded down), at most ``max_calibration``;
    evaluation gets all the others.
    """
    order = np.random.default_rng(SPLIT_SEED).permutation(len(feeds))
    n_cal = min(max_calibration, len(feeds) // 2)
    calibration = [feeds[i] for i in order[:n_cal]]
    evaluation = [feeds[i] for i in order[n_cal:]]
    return calibration, evaluation


def load_samples(
    hook: Any,
    data: Path | str | None,
    inputs: Sequence[InputSpec],
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Samples:
    """Samples from ``data`` via ``slimfleet_load_data``, or random ones with a warning.

    ``hook`` is a plugin manager's ``pm.hook``. Every feed a plugin returns is checked
    against ``inputs``; ``input_shapes`` (``--input-shape``) sizes random inputs.
    """
    shapes = dict(input_shapes or {})
    check_feedable(inputs)
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
        feeds = [conform_feed(f, inputs, f"{path} sample {i}") for i, f in enumerate(feeds)]
        if bad := [i for i, f in enumerate(feeds) if not _finite(f)]:
            warnings.append(
                f"--data {path}: {len(bad)} of {len(feeds)} samples hold NaN or Inf (first: "
                f"sample {bad[0]}); a model's outputs on them are rarely comparable, so "
                "candidates may all be rejected"
            )
        if shapes:
            warnings.append("--input-shape only sizes random inputs; ignored with --data")
        source = str(path)
    calibration, evaluation = split(feeds)
    if not calibration:
        warnings.append("only one sample: it is used for evaluation, none for calibration")
    for text in warnings:
        log.warning(text)
    return Samples(calibration, evaluation, source, warnings)
