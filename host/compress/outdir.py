"""The output directory of ``compress``: checked before the search, written atomically after."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from slimfleet.agent.errors import InputError

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
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over ``path``.

    The file gets the usual permissions (0666 less the umask), unlike ``mkstemp``'s 0600.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
