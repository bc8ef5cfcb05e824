"""The output directory of ``compress``: checked before the search, written atomically after.

The files of one output are written into a staging directory inside it first and moved
into place together (:func:`staged`), ``report.json`` last: a full disk or a failed write
leaves the directory as it was, never a new model beside an earlier report."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimfleet.agent.errors import InputError
from slimfleet.agent.store import atomic_write_bytes
from slimfleet.agent.wire import loads_json
from slimfleet.host.compress import modelfile

MODEL = "model.onnx"
MODEL_DATA = MODEL + ".data"
"""The chosen model's external data, written only when it would pass protobuf's 2 GB."""
CONVERTED = "converted.onnx"
"""What a front-end converted a non-ONNX source to, written before the search."""
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
SAMPLE = "sample.npz"
STAGE_PREFIX = ".slimfleet-output-"
"""Staging directories :func:`staged` makes inside OUTDIR."""
STALE_STAGE_S = 3600
"""A staging directory untouched this long was left by a killed run (staging takes
seconds to minutes): :func:`prepare` removes it. A younger one may be another run's, in
the middle of its moves, and is left alone."""


def earlier_output(path: Path) -> bool:
    """True when ``path`` holds a report.json written by slimfleet compress."""
    try:
        doc = loads_json((path / REPORT_JSON).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "slimfleet_version" in doc


def prepare(outdir: Path | str, *, force: bool = False) -> Path:
    """Create ``outdir`` if needed and prove it is writable, before any long work starts.

    A non-empty directory that is not an earlier output is refused unless ``force``:
    compress overwrites model.onnx there, and a typo in ``-o`` must not cost a file.
    """
    path = Path(outdir)
    if path.is_dir():
        _remove_stale_stages(path)
    if path.is_dir() and not force and _user_files(path) and not earlier_output(path):
        raise InputError(
            f"output directory {path} is not empty and holds no earlier slimfleet output; "
            "choose another or pass --force to write into it"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".slimfleet-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"output directory {path}: cannot write there ({exc.strerror})") from None
    return path


def _stages(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name.startswith(STAGE_PREFIX) and p.is_dir()]


def _user_files(path: Path) -> bool:
    """True when ``path`` holds anything but staging directories of slimfleet's."""
    stages = set(_stages(path))
    return any(p not in stages for p in path.iterdir())


def _remove_stale_stages(path: Path) -> None:
    """Remove what a run killed while staging (SIGKILL, power loss) left in ``path``."""
    now = time.time()
    for stage in _stages(path):
        try:
            if now - stage.stat().st_mtime > STALE_STAGE_S:
                shutil.rmtree(stage, ignore_errors=True)
        except OSError:
            continue  # gone meanwhile, or not ours to read: the check below judges


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, with the usual permissions (0666 less the
    umask) rather than the agent store's private ones."""
    atomic_write_bytes(path, data, mode=0o666)


def stale_files(out: Path, source: Path) -> tuple[str, ...]:
    """Files of an earlier output in ``out`` that an ONNX run from ``source`` replaces
    and does not write: a front-end run's ``converted.onnx`` (unless it is ``source``
    itself). Asked before the run, while ``out``'s report.json is still the earlier one's;
    a directory that holds no earlier output has none (its files are the user's)."""
    conversion = out / CONVERTED
    if not earlier_output(out) or not conversion.is_file():
        return ()
    return () if conversion.resolve() == source.resolve() else (CONVERTED,)


@contextmanager
def staged(out: Path, *, stale: tuple[str, ...] = ()) -> Iterator[Path]:
    """A staging directory inside ``out`` to write one output's files into. When the block
    ends without an error they replace their namesakes in ``out`` (``report.json`` last;
    an earlier ``model.onnx.data`` and the ``stale`` files the new output lacks are
    removed); on an error nothing in ``out`` changes. The staging directory is removed
    either way."""
    stage = Path(tempfile.mkdtemp(dir=out, prefix=STAGE_PREFIX))
    try:
        yield stage
        files = sorted(stage.iterdir(), key=lambda p: p.name == REPORT_JSON)
        for path in files:  # the one rename failure a same-directory move can meet, first
            if (out / path.name).is_dir():
                raise IsADirectoryError(
                    errno.EISDIR, os.strerror(errno.EISDIR), str(out / path.name)
                )
        for path in files:
            os.replace(path, out / path.name)
        for name in {MODEL_DATA, *stale} - {p.name for p in files}:
            (out / name).unlink(missing_ok=True)  # an earlier output's
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_model(out: Path, source: Path) -> list[str]:
    """Write the model at ``source`` as ``out/model.onnx``; the names of the files written.

    A self-contained model is copied byte for byte. One whose weights sit in external
    data files is written self-contained when it fits under protobuf's 2 GB, else as
    ``model.onnx`` plus ``model.onnx.data``.
    """
    if not modelfile.external_files(source):
        write_atomic(out / MODEL, source.read_bytes())
        return [MODEL]
    model = modelfile.load_model(source, external_data=True)
    if model.ByteSize() < modelfile.EXTERNAL_DATA_LIMIT:
        write_atomic(out / MODEL, model.SerializeToString())
        return [MODEL]
    modelfile.save_model(model, out / MODEL)
    return [MODEL, MODEL_DATA]
