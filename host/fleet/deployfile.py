"""The deployment file: a device's slots in YAML, read with file:line errors and written back.

Format (one file describes a whole deployment)::

    slots:
      det:
        models: [ocr-det@3]
      rec:
        models: [ocr-rec@5, ocr-rec@4]      # tiers, first to last
        gate: {function: ctc_min_prob, threshold: 0.81}
        remote: {url: http://ocr.example/v2/models/rec/infer, timeout_s: 2}

``slimfleet assign --deployment FILE`` sends it; ``slimfleet chain calibrate`` writes a
slot's gate threshold into it with :func:`set_gate`. The wire contract
(:class:`~slimfleet.agent.deployment.SlotSpec`) stays the single authority on what is valid:
this module only adds the positions to its errors.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from slimfleet.agent.configfile import Node, load_yaml, parse_yaml
from slimfleet.agent.deployment import (
    MAX_SLOTS,
    Deployment,
    Gate,
    SlotSpec,
    check_slot,
    deployment_to_dict,
)
from slimfleet.agent.errors import ConfigError, InputError, VerifyError
from slimfleet.agent.wire import ModelRef

NOWHERE_TO_ESCALATE = (
    "a gate escalates to a second model or a remote tier, and the slot has neither"
)


def load_deployment(path: str | Path) -> Deployment:
    """Read a deployment file; every problem is a ConfigError naming file and line."""
    return _deployment(load_yaml(path))


def parse_deployment(text: str, file: str = "<deployment>") -> Deployment:
    """Parse deployment-file text (see the module docstring)."""
    return _deployment(parse_yaml(text, file))


def dump_deployment(deployment: Deployment) -> str:
    """The YAML text of a deployment; :func:`parse_deployment` reads it back unchanged."""
    slots: dict[str, Any] = {}
    for slot, doc in deployment_to_dict(deployment).items():
        doc["models"] = [str(ModelRef.from_dict(m)) for m in doc["models"]]
        slots[slot] = doc
    return yaml.safe_dump({"slots": slots}, sort_keys=False, default_flow_style=None)


def write_deployment(path: str | Path, deployment: Deployment) -> None:
    """Write ``deployment`` to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    text = dump_deployment(deployment)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the deployment: {exc.strerror or exc}") from None


def set_gate(path: str | Path, slot: str, gate: Gate) -> Deployment:
    """Set ``slot``'s gate in the deployment file at ``path`` and return the new deployment.

    The slot must already exist in the file (its models are what the gate escalates
    between). Comments in the file are not preserved.
    """
    deployment = load_deployment(path)
    deployment[slot] = _gated(path, deployment, slot, gate)
    write_deployment(path, deployment)
    return deployment


def check_gate_slot(path: str | Path, slot: str) -> None:
    """What :func:`set_gate` would refuse, checked before the work that finds the gate:
    no such slot, or one with nowhere to escalate to (an InputError)."""
    _gated(path, load_deployment(path), slot, Gate("max_prob", 0.5))


def _gated(path: str | Path, deployment: Deployment, slot: str, gate: Gate) -> SlotSpec:
    if slot not in deployment:
        known = ", ".join(sorted(deployment)) or "none"
        raise InputError(f"{path}: no slot {slot!r} to set a gate on (slots: {known})")
    spec = SlotSpec(deployment[slot].models, gate, deployment[slot].remote)
    if not spec.gate_escalates:
        raise InputError(f"{path}: slot {slot!r}: {NOWHERE_TO_ESCALATE}")
    return spec


def _deployment(root: Node) -> Deployment:
    root.reject_unknown({"slots"})
    slots = root.require("slots")
    mapping = slots.as_mapping()
    if not mapping:
        raise slots.error("expected at least one slot")
    if len(mapping) > MAX_SLOTS:
        raise slots.error(f"at most {MAX_SLOTS} slots, got {len(mapping)}")
    deployment: Deployment = {}
    for slot, node in mapping.items():
        try:
            check_slot(slot)
        except ValueError as exc:
            raise ConfigError(f"{node.file}:{node.key_line or node.line}: {exc}") from None
        deployment[slot] = _slot(node)
    return deployment


def _slot(node: Node) -> SlotSpec:
    """One slot: ``models`` as ``name@version`` strings, then the contract's own checks."""
    node.reject_unknown({"models", "gate", "remote"})
    models = node.require("models")
    refs = []
    for item in models.items():
        try:
            refs.append(ModelRef.parse(item.str()).to_dict())
        except ValueError as exc:
            raise item.error(str(exc)) from None
    doc = node.plain() | {"models": refs}
    try:
        spec = SlotSpec.from_dict(doc, node.path)
    except VerifyError as exc:
        what = str(exc).partition(": ")[2] or str(exc)
        raise _field_node(node, str(exc)).error(what) from None
    if not spec.gate_escalates:
        raise node.require("gate").error(NOWHERE_TO_ESCALATE)
    return spec


def _field_node(node: Node, message: str) -> Node:
    """The sub-node of a slot that a contract error names (``<slot>.gate: ...``)."""
    for key in ("models", "gate", "remote"):
        if message.startswith(f"{node.path}.{key}") and node.get(key) is not None:
            field = node.require(key)
            sub = message[len(f"{node.path}.{key}") :].split(":")[0].lstrip(".")
            if sub and isinstance(field.value, dict) and field.get(sub) is not None:
                return field.require(sub)
            return field
    return node
