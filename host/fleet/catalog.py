"""``slimfleet models``: what is published on the broker, checked, and which devices run it.

Reads only the retained manifests (``<prefix>/models/+/+/manifest``, never a chunk) and
the devices' retained state. Each manifest's signature is checked against the fleet's
public key, the key devices pin; a manifest that fails is still listed, with the reason.
At most :data:`MAX_MANIFESTS` manifests are read (the broker's retained store bounds the
rest); each is at most one MQTT payload.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from slimfleet.agent.errors import SlimfleetError, VerifyError
from slimfleet.agent.signing import Verifier
from slimfleet.agent.wire import Manifest, ModelRef, loads_json
from slimfleet.host.fleet.config import FleetConfig
from slimfleet.host.fleet.fleetview import FleetView
from slimfleet.host.fleet.mqttio import DEFAULT_TIMEOUT_S
from slimfleet.host.fleet.status import text_table
from slimfleet.host.fleet.watch import FleetFeed, report_filters

MAX_MANIFESTS = 10_000
CATALOG_COLUMNS = ("MODEL", "SIZE", "CHUNKS", "KEY", "EXPIRES", "SIGNATURE", "RUNNING ON")


@dataclass
class PublishedModel:
    """One published version as read back from the broker."""

    name: str
    version: int
    size: int | None = None
    chunks: int | None = None
    key_id: str | None = None
    created: float | None = None
    expires: float | None = None
    expired: bool = False
    signature_valid: bool | None = None  # None: the fleet's public key could not be read
    problem: str | None = None  # why the signature or the manifest is not good
    devices: list[str] = field(default_factory=list)  # "device/slot" running it (any tier)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Catalog:
    """Manifests by (name, version), fed from a subscription; ``_lock`` guards ``_models``."""

    def __init__(self, verifier: Verifier | None, problem: str | None) -> None:
        self.verifier, self.key_problem = verifier, problem
        self._models: dict[tuple[str, int], PublishedModel] = {}
        self._lock = threading.Lock()

    def published(self) -> list[PublishedModel]:
        """The manifests read so far, by name then version."""
        with self._lock:
            return sorted(self._models.values(), key=lambda m: (m.name, m.version))

    def ingest(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) < 4 or parts[-1] != "manifest" or not parts[-2].isdigit():
            return
        name, version = parts[-3], int(parts[-2])
        with self._lock:
            if not payload:
                self._models.pop((name, version), None)
            elif len(self._models) < MAX_MANIFESTS or (name, version) in self._models:
                self._models[(name, version)] = self._read(name, version, payload)

    def _read(self, name: str, version: int, payload: bytes) -> PublishedModel:
        model = PublishedModel(name, version)
        try:
            signed = loads_json(payload)["signed"]
            manifest = Manifest.from_dict(signed)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            model.problem = f"not a signed manifest envelope ({exc})"
            return model
        except VerifyError as exc:
            model.problem = str(exc)
            return model
        model.size, model.chunks, model.key_id = (
            manifest.size,
            manifest.chunk_count,
            manifest.key_id,
        )
        model.created, model.expires = manifest.created, manifest.expires
        model.expired = manifest.expired()
        if (manifest.name, manifest.version) != (name, version):
            model.problem = f"the manifest describes {manifest.name}@{manifest.version}"
        if self.verifier is None:
            model.problem = model.problem or self.key_problem
            return model
        try:
            self.verifier.verify(payload, f"{name}@{version}")
            model.signature_valid = model.problem is None
        except VerifyError as exc:
            model.signature_valid = False
            model.problem = str(exc)
        return model


def read_catalog(fleet: FleetConfig, *, timeout: float = DEFAULT_TIMEOUT_S) -> list[PublishedModel]:
    """Every published version, sorted by name then version, with the devices running it."""
    try:
        verifier, problem = fleet.verifier(), None
    except SlimfleetError as exc:
        verifier, problem = None, f"signature not checked: {exc}"
    catalog = Catalog(verifier, problem)
    view = FleetView(fleet.topics, list(fleet.devices))

    def handle(topic: str, payload: bytes) -> None:
        if view.ingest(topic, payload) is None:
            catalog.ingest(topic, payload)

    with FleetFeed(fleet.broker, handle, timeout=timeout) as feed:
        feed.subscribe(
            [f"{fleet.prefix}/models/+/+/manifest", *report_filters(fleet.topics, ("state",))]
        )
    running: dict[ModelRef, list[str]] = {}
    for report in view.reports():
        if report.state is None:
            continue
        for slot, tiers in sorted(report.state.deployment.items()):
            for ref in tiers:
                running.setdefault(ref, []).append(f"{report.device}/{slot}")
    models = catalog.published()
    for model in models:
        try:
            model.devices = running.get(ModelRef(model.name, model.version), [])
        except ValueError:  # a topic level that is not a valid model name
            model.problem = model.problem or f"invalid model name {model.name!r}"
    return models


def format_catalog(models: list[PublishedModel]) -> str:
    if not models:
        return "no models are published"
    lines = []
    for m in models:
        if m.signature_valid:
            signature = "valid"
        else:
            signature = ("INVALID: " if m.signature_valid is False else "? ") + (m.problem or "")
        expires = "never"
        if m.expires is not None:
            try:
                expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(m.expires))
            except (OverflowError, OSError, ValueError):  # past what a calendar holds
                expires = f"{m.expires:.6g} s"
        lines.append(
            [
                f"{m.name}@{m.version}",
                "-" if m.size is None else str(m.size),
                "-" if m.chunks is None else str(m.chunks),
                m.key_id or "-",
                expires + (" (expired)" if m.expired else ""),
                signature,
                ", ".join(m.devices) or "-",
            ]
        )
    return "\n".join(text_table(CATALOG_COLUMNS, lines))
