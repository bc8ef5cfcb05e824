"""Samples and outputs kept on disk, one ``.npz`` per sample, read back one at a time.

A search holds many samples (64 images of 3x640x640 are 300 MB) and, per candidate,
every output of every sample. :class:`ArrayFiles` is a read-only sequence over such
files: indexing loads one sample, iterating loads them in turn, so at most one sample
(plus whatever the caller keeps) is in memory. Each file stores its arrays under
positional keys with their names beside, so any tensor name (``a/b:0``) survives.

Imports numpy only: the evaluation's child process reads its samples through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import overload

import numpy as np

Arrays = dict[str, np.ndarray]
_NAMES = "names"


def write(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Save ``arrays`` (name -> array) to ``path`` (an uncompressed ``.npz``).

    onnxruntime returns a string tensor as an array of Python ``str`` objects, which
    ``.npz`` could only hold pickled (and :func:`read` never unpickles): it is stored as
    a fixed-width unicode array, the same strings."""
    names = list(arrays)
    np.savez(
        path,
        **{_NAMES: np.array(names, dtype=str)},
        **{f"a{i}": _storable(arrays[n]) for i, n in enumerate(names)},
    )
    return path


def _storable(value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object and all(isinstance(v, str) for v in array.flat):
        return array.astype(str)
    return array


def read(path: Path | str) -> Arrays:
    """The arrays :func:`write` saved, by name, in their order."""
    with np.load(path, allow_pickle=False) as npz:
        if _NAMES not in npz.files:  # a plain .npz: its keys are the names
            return {key: npz[key] for key in npz.files}
        names = [str(n) for n in npz[_NAMES]]
        return {name: npz[f"a{i}"] for i, name in enumerate(names)}


def paths_in(directory: Path, count: int) -> list[Path]:
    """``directory/sample-0000.npz`` ... for ``count`` samples."""
    return [directory / f"sample-{i:04d}.npz" for i in range(count)]


def write_all(items: Iterable[Mapping[str, np.ndarray]], directory: Path) -> list[Path]:
    """Write each item to its own file in ``directory`` (consuming ``items`` lazily)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arrays in enumerate(items):
        paths.append(write(directory / f"sample-{i:04d}.npz", arrays))
    return paths


class ArrayFiles(Sequence[Arrays]):
    """A read-only sequence of samples stored one file each; loads on access."""

    def __init__(self, paths: Sequence[Path | str]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> Arrays: ...

    @overload
    def __getitem__(self, index: slice) -> ArrayFiles: ...

    def __getitem__(self, index: int | slice) -> Arrays | ArrayFiles:
        if isinstance(index, slice):
            return ArrayFiles(self.paths[index])
        return read(self.paths[index])

    def __iter__(self) -> Iterator[Arrays]:
        for path in self.paths:
            yield read(path)

    def __repr__(self) -> str:
        return f"ArrayFiles({len(self)} files)"
