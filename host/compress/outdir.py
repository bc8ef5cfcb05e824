"""The output directory of ``compress``: checked before the search, written atomically after."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from slimfleet.agent.errors import InputError
from slimfleet.agent.store import atomic_write_bytes

MODEL = "model.onnx"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
SAMPLE = "sample.npz"


def prepare(outdir: Path | str) -> Path:
    """Create ``outdir`` if needed and prove it is writable, before any long work starts."""
    path = Path(outdir)
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
