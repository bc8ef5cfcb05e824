"""DeploymentServer test helpers: one-slot deployments of add-constant models, events
recorded, servers closed after the test (fixtures ``recorder`` and ``make_serving``)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from slimfleet.agent import wire
from slimfleet.agent.deployment import SlotSpec
from slimfleet.agent.serving import DeploymentServer, ModelSource
from slimfleet.agent.watch import WatchPolicy
from slimfleet.agent.wire import ModelRef, SmokeTest

EVENT_TYPES = {v for k, v in vars(wire).items() if k.startswith("EVENT_") and isinstance(v, str)}

X = np.full((1, 4), 0.5, dtype=np.float32)
NO_WATCH = WatchPolicy(window_s=0)


def ref(version: int, name: str = "m") -> ModelRef:
    return ModelRef(name, version)


def main(version: int) -> dict[str, SlotSpec]:
    return {"main": SlotSpec((ref(version),))}


def loaded(version: int) -> dict[str, list[dict[str, Any]]]:
    return {"main": [ref(version).to_dict()]}


def smoke_for(value: float, **kwargs: Any) -> SmokeTest:
    """The smoke test an add-``value`` model passes."""
    return SmokeTest(inputs={"x": X}, outputs={"y": X + np.float32(value)}, **kwargs)


def serve(
    server: DeploymentServer,
    version: int,
    path: Path,
    smoke: SmokeTest | None = None,
    *,
    watch: bool = True,
    max_latency_ms: float | None = None,
) -> dict[str, Any]:
    """Activate m@version alone in slot main."""
    sources = {ref(version): ModelSource(path, smoke)}
    return server.activate(main(version), sources, watch=watch, max_latency_ms=max_latency_ms)


def infer(server: DeploymentServer, feeds: Any = None, cast: bool = False) -> dict[str, Any]:
    return server.predict("main", {"x": X} if feeds is None else feeds, cast=cast).outputs


def current(server: DeploymentServer) -> ModelRef | None:
    serving = server.current()
    return ModelRef.from_dict(serving["main"][0]) if serving else None


class Recorder:
    """Collects events and callback calls from a DeploymentServer."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.fallbacks: list[tuple[Any, Any, str]] = []
        self.settled: list[Any] = []
        self.changed = threading.Event()

    def on_event(self, event: dict[str, Any]) -> None:
        assert event["type"] in EVENT_TYPES, event  # every type is part of the wire format
        self.events.append(event)

    def on_fallback(self, bad: Any, good: Any, reason: str) -> None:
        self.fallbacks.append((bad, good, reason))
        self.changed.set()

    def on_settled(self, spec: Any) -> None:
        self.settled.append(spec)
        self.changed.set()

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


def value_of(outputs: dict[str, np.ndarray]) -> float:
    """Which add-constant model answered (all four elements must agree)."""
    y = outputs["y"] - X
    assert np.allclose(y, y.flat[0]), y
    return round(float(y.flat[0]), 3)


class PipelineClients:
    """Threads that run slot det then slot rec on one pinned deployment, non-stop, with
    the GIL switching every microsecond while the block runs.

    Deployment v must have det adding v and rec adding 10 v; every answer is checked
    against that and against each other (a torn set: det and rec of different
    deployments). ``failures`` lists every exception, ``seen`` the versions served.
    """

    def __init__(self, server: Any, threads: int = 4) -> None:
        self.server = server
        self.failures: list[BaseException] = []
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(threads)]
        self._interval = sys.getswitchinterval()

    def _client(self) -> None:
        x = np.full((1, 4), 0.5, dtype=np.float32)
        while not self._stop.is_set():
            try:
                with self.server.pinned() as serving:
                    det = serving.predict("det", {"x": x})
                    rec = serving.predict("rec", {"x": x})
                v = det.model.version
                assert rec.model.version == v, f"torn: {det.model} with {rec.model}"
                assert np.allclose(det.outputs["y"] - x, v), det
                assert np.allclose(rec.outputs["y"] - x, 10 * v), rec
                self.seen.add(v)
            except BaseException as exc:  # every failure is the finding
                self.failures.append(exc)

    def __enter__(self) -> PipelineClients:
        sys.setswitchinterval(1e-6)
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        sys.setswitchinterval(self._interval)
