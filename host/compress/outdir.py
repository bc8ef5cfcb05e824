"""The output directory of ``compress``: checked before the search, written atomically after."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from slimfleet.agent.errors import InputError
from slimfleet.agent.store import atomic_write_bytes
from slimfleet.host.compress import modelfile

MODEL = "model.onnx"
MODEL_DATA = MODEL + ".data"
"""The chosen model's external data, written only when it would pass protobuf's 2 GB."""
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
SAMPLE = "sample.npz"


def earlier_output(path: Path) -> bool:
    """True when ``path`` holds a report.json written by slimfleet compress."""
    try:
        doc = json.loads((path / REPORT_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "slimfleet_version" in doc


def prepare(outdir: Path | str, *, force: bool = False) -> Path:
    """Create ``outdir`` if needed and prove it is writable, before any long work starts.

    A non-empty directory that is not an earlier output is refused unless ``force``:
    compress overwrites model.onnx there, and a typo in ``-o`` must not cost a file.
    """
    path = Path(outdir)
    if path.is_dir() and not force and any(path.iterdir()) and not earlier_output(path):
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, with the usual permissions (0666 less the
    umask) rather than the agent store's private ones."""
    atomic_write_bytes(path, data, mode=0o666)


def write_model(out: Path, source: Path) -> list[str]:
    """Write the model at ``source`` as ``out/model.onnx``; the names of the files written.

    A self-contained model is copied byte for byte. One whose weights sit in external
    data files is written self-contained when it fits under protobuf's 2 GB, else as
    ``model.onnx`` plus ``model.onnx.data`` (the data renamed into place first).
    """
    if not modelfile.external_files(source):
        write_atomic(out / MODEL, source.read_bytes())
        (out / MODEL_DATA).unlink(missing_ok=True)  # an earlier output's
        return [MODEL]
    model = modelfile.load_model(source, external_data=True)
    if model.ByteSize() < modelfile.EXTERNAL_DATA_LIMIT:
        write_atomic(out / MODEL, model.SerializeToString())
        (out / MODEL_DATA).unlink(missing_ok=True)
        return [MODEL]
    with tempfile.TemporaryDirectory(dir=out, prefix=".slimfleet-model-") as tmp:
        modelfile.save_model(model, Path(tmp) / MODEL)
        os.replace(Path(tmp) / MODEL_DATA, out / MODEL_DATA)
        os.replace(Path(tmp) / MODEL, out / MODEL)
    return [MODEL, MODEL_DATA]
