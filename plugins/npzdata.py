"""Built-in data reader: a ``.npz`` of stacked samples, or a directory of ``.npz`` samples.

* ``samples.npz``: keys are input names, axis 0 counts samples. An array with one axis
  more than the model input holds whole inputs (``[N, 1, 3, 32, 32]`` for a
  ``1x3x32x32`` input); one with the same rank is split into batches of one
  (``[N, 64]`` for a ``batch x 64`` input).
* a directory: every ``*.npz`` in it (sorted by name) is one sample, so shapes may vary
  between files (e.g. image widths). Arrays without the batch axis get one.

Runs last (``trylast``) so a plugin can take over ``.npz`` files it knows better.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimfleet.agent.errors import InputError
from slimfleet.host.feeds import check_keys, conform_feed, load_npz, show_shape
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Feed


def _read(path: Path, inputs: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    arrays = load_npz(path)
    check_keys(arrays, inputs, str(path))
    return arrays


def _rank(spec: dict[str, Any], array: np.ndarray) -> int:
    return len(spec["shape"]) if spec["shape"] is not None else array.ndim


def _stacked(path: Path, arrays: dict[str, np.ndarray], inputs: Sequence[dict]) -> list[Feed]:
    samples: dict[str, list[np.ndarray]] = {}
    for spec in inputs:
        name, array = spec["name"], arrays[spec["name"]]
        rank = _rank(spec, array)
        if array.ndim == rank + 1:
            samples[name] = [np.asarray(item) for item in array]  # 0-d items stay arrays
        elif array.ndim == rank > 0:
            samples[name] = [array[i : i + 1] for i in range(len(array))]
        else:
            raise InputError(
                f"{path}: key {name!r} has shape {show_shape(array.shape)}; expected samples "
                f"stacked on axis 0 of {spec['dtype']} {show_shape(spec['shape'])} inputs"
            )
    counts = {name: len(items) for name, items in samples.items()}
    if len(set(counts.values())) > 1:
        raise InputError(f"{path}: keys hold different sample counts {counts}")
    rows = zip(*samples.values(), strict=True)
    return [
        conform_feed(dict(zip(samples, row, strict=True)), inputs, f"{path} sample {i}")
        for i, row in enumerate(rows)
    ]


def _single(path: Path, arrays: dict[str, np.ndarray], inputs: Sequence[dict]) -> Feed:
    feed = {}
    for spec in inputs:
        array = arrays[spec["name"]]
        feed[spec["name"]] = array[np.newaxis] if array.ndim == _rank(spec, array) - 1 else array
    return conform_feed(feed, inputs, str(path))


@hookimpl(trylast=True)
def slimfleet_load_data(path: Path, inputs: Sequence[dict[str, Any]]) -> list[Feed] | None:
    """Read a ``.npz`` file, or a folder of them, as samples (runs after other readers)."""
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise InputError(f"{path}: no .npz files in this directory")
        return [_single(f, _read(f, inputs), inputs) for f in files]
    if path.suffix.lower() != ".npz":
        return None
    return _stacked(path, _read(path, inputs), inputs)
