"""The one definition of how slimfleet opens an onnxruntime session.

The agent serves with these options, the host evaluates and races compression
candidates with them, and the benchmarks time with them: what we measure must be what
the device runs. CPU execution provider, ``threads`` intra-op threads, one inter-op
thread, sequential execution.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

#: onnxruntime's log severities: 0 verbose .. 3 error, 4 fatal.
QUIET = 3


def session_options(threads: int = 1, *, log_severity: int = QUIET) -> ort.SessionOptions:
    """Session options for ``threads`` intra-op threads, sequential, CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = log_severity
    return options


def open_session(
    model: str | Path | bytes, threads: int = 1, *, log_severity: int = QUIET
) -> ort.InferenceSession:
    """A CPU session on a model file (or its bytes) with :func:`session_options`."""
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(
        source,
        sess_options=session_options(threads, log_severity=log_severity),
        providers=["CPUExecutionProvider"],
    )
