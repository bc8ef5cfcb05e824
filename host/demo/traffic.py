"""Requests through the agents' Open Inference Protocol v2 HTTP API, counted by model.

A pipeline request is two OIP calls: ``features`` on a sensor reading, then
``classify`` on the features it answered. :class:`Load` sends them from one thread
until stopped (at most ``max_requests``), counting which model answered ``classify``.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass

import numpy as np

REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Reply:
    output: np.ndarray  # the first output
    model: str  # name@version that answered
    tier: str


def infer(url: str, slot: str, name: str, array: np.ndarray) -> Reply:
    """``POST /v2/models/{slot}/infer`` with one FP32 JSON tensor; the first output."""
    body = {
        "inputs": [
            {
                "name": name,
                "datatype": "FP32",
                "shape": list(array.shape),
                "data": array.reshape(-1).tolist(),
            }
        ]
    }
    request = urllib.request.Request(
        f"{url}/v2/models/{slot}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        doc = json.loads(response.read())
    out = doc["outputs"][0]
    parameters = doc.get("parameters", {})
    return Reply(
        np.asarray(out["data"], np.float32).reshape(out["shape"]),
        parameters.get("slimfleet_model", "?"),
        parameters.get("slimfleet_tier", "?"),
    )


def pipeline(url: str, reading: np.ndarray) -> Reply:
    """``features`` then ``classify``: the classify reply."""
    features = infer(url, "features", "x", reading)
    return infer(url, "classify", "f", features.output)


class Tally:
    """Which model answered ``classify``, and the requests that failed (with one reason).

    ``_lock`` guards ``answered``, ``failed`` and ``first_error``: the load thread writes
    them while the demo reads :attr:`total`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answered: Counter[str] = Counter()
        self.failed = 0
        self.first_error: str | None = None

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.answered.values()) + self.failed

    def send(self, url: str, reading: np.ndarray) -> None:
        try:
            model = pipeline(url, reading).model
        except (OSError, ValueError, KeyError) as exc:  # HTTPError and URLError are OSErrors
            with self._lock:
                self.failed += 1
                self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            self.answered[model] += 1


class Load:
    """Pipeline requests from one thread until :meth:`stop` (or ``max_requests``).

    Read ``tally.total`` while it runs (locked), the rest of ``tally`` after :meth:`stop`.
    """

    def __init__(self, url: str, readings: np.ndarray, max_requests: int) -> None:
        self.tally = Tally()
        self._url, self._readings, self._max = url, readings, max_requests
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i in range(self._max):
            if self._stopped.is_set():
                return
            self.tally.send(self._url, self._readings[i % len(self._readings)])

    def wait_for(self, requests: int, timeout: float) -> None:
        """Until ``requests`` were sent (or the thread ended, or ``timeout``)."""
        for _ in range(int(timeout / 0.05)):
            if self.tally.total >= requests or not self._thread.is_alive():
                return
            self._stopped.wait(0.05)

    def stop(self) -> Tally:
        self._stopped.set()
        self._thread.join(REQUEST_TIMEOUT_S * 2 + 1)
        return self.tally
