"""``slimfleet chain calibrate``: the gate threshold of a fallback chain, from measurement.

It runs every tier on the user's samples with the agent's session options
(:func:`slimfleet.agent.runtime.open_session`, so it measures what the device runs),
records each tier's confidence (the gate function), latency, and whether its answer
agrees with the strongest (last) tier's, judged as ``slimfleet compress`` judges
fidelity (:mod:`slimfleet.host.compress.fidelity`: greedy-CTC text for sequence
scores, top-1 for class scores). Then for every threshold it replays the chain
(:func:`curve`): a sample is answered by the first tier whose confidence is at least
the threshold, else by the last. It picks the threshold of highest agreement whose
escalation rate is within the budget (:func:`pick`), prints the trade-off curve and
writes ``gate: {function, threshold}`` into the deployment file's slot.

Bounds: every sample is held in memory with every tier's outputs (the samples file is
the user's choice); at most :data:`MAX_THRESHOLDS` thresholds are replayed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from slimfleet.agent.chain import SessionTier, first_line
from slimfleet.agent.confidence import (
    BUILTINS,
    Confidence,
    check_shape,
    function_for_shape,
    resolve_confidence,
)
from slimfleet.agent.deployment import Gate, check_slot
from slimfleet.agent.errors import InputError, SlimfleetError
from slimfleet.agent.runtime import open_session
from slimfleet.host.compress.data import load_samples
from slimfleet.host.compress.fidelity import compare
from slimfleet.host.compress.metricdetection import signature_specs
from slimfleet.host.compress.metricspec import MetricSpec, parse_metric
from slimfleet.host.compress.modelfile import io_signature, load_model
from slimfleet.host.fleet.deployfile import check_gate_slot, set_gate
from slimfleet.host.plugins import load_plugins

MAX_THRESHOLDS = 2000
"""Distinct confidences beyond this are thinned to this many quantiles."""
BUDGET_STEP = 0.05
"""The printed curve has a line per this much escalation budget (5%, 10%, ...)."""


@dataclass(frozen=True)
class Point:
    """The chain at one threshold: share of requests escalated past the first tier,
    share whose answer agrees with the strongest tier, mean latency / strongest's."""

    threshold: float
    escalation: float
    agreement: float
    latency_ratio: float


@dataclass
class Measured:
    """Per tier (first to last) and sample: confidence, agreement with the last, seconds
    (a gated tier's include computing its confidence)."""

    confidence: np.ndarray  # [tiers, samples]; NaN where unknown, and for the last tier
    agreement: np.ndarray  # [tiers, samples] in [0, 1]; the last tier's row is all 1
    seconds: np.ndarray  # [tiers, samples]


def thresholds(confidence: np.ndarray) -> np.ndarray:
    """Candidate thresholds: every distinct finite confidence of the gated tiers (at most
    :data:`MAX_THRESHOLDS`), and one above them all (escalate everything)."""
    values = np.unique(confidence[np.isfinite(confidence)])
    if values.size > MAX_THRESHOLDS:
        values = np.unique(np.quantile(values, np.linspace(0, 1, MAX_THRESHOLDS)))
    top = np.nextafter(values[-1], np.inf) if values.size else 1.0
    return np.append(values, top)


def curve(measured: Measured) -> list[Point]:
    """The chain replayed at every candidate threshold (see the module docstring)."""
    tiers, samples = measured.agreement.shape
    gated = measured.confidence[:-1]
    strongest = float(measured.seconds[-1].mean())
    cumulative = np.cumsum(measured.seconds, axis=0)  # a request pays every tier it tried
    columns = np.arange(samples)
    points = []
    for t in thresholds(gated):
        passes = gated >= t  # NaN never passes
        answered = np.where(passes.any(0), passes.argmax(0), tiers - 1)
        points.append(
            Point(
                float(t),
                float((answered > 0).mean()),
                float(measured.agreement[answered, columns].mean()),
                float(cumulative[answered, columns].mean() / strongest) if strongest else math.nan,
            )
        )
    return points


def pick(points: Sequence[Point], budget: float) -> Point | None:
    """The highest-agreement point whose escalation is within ``budget``; among equals the
    highest threshold, so the budget the user granted is spent: the samples are finite,
    and on requests they did not show the margin buys agreement. None when none fits."""
    fitting = [p for p in points if p.escalation <= budget + 1e-12]
    return max(fitting, key=lambda p: (p.agreement, p.threshold), default=None)


def budget_lines(points: Sequence[Point], step: float = BUDGET_STEP) -> list[tuple[float, Point]]:
    """The best point at each budget step, until agreement is total."""
    lines = []
    steps = round(1 / step)
    for i in range(steps + 1):
        best = pick(points, i / steps)
        if best is not None:
            lines.append((i / steps, best))
            if best.agreement >= 1.0:
                break
    return lines


def parse_budget(text: str) -> float:
    """``15%`` or ``0.15`` -> 0.15; an InputError otherwise."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise InputError(f"--budget {text!r}: expected a share of requests, e.g. 15% or 0.15")
    return value


def agreement_spec(
    agree: str, reference: list[dict[str, np.ndarray]], signature: dict[str, Any]
) -> tuple[str, MetricSpec]:
    """The first output's name and how to judge it: ``auto`` detects it from the
    strongest tier's outputs and ``signature`` as the search does (a tagger reading
    tokens is judged step by step, a segmenter's map by its label maps), ``text`` is
    greedy-CTC text equality, anything else is ``KIND[:OPTION=VALUE]`` as ``--metric``."""
    name = next(iter(reference[0]))
    detected = signature_specs(reference, signature)[name]
    if agree == "auto":
        return name, detected
    if agree == "text":
        if detected.kind != "ctc":
            raise InputError(
                f"--agree text: output {name!r} does not look like sequence scores "
                f"[T, 1, C] (it judges as {detected.label()}); try --agree top1"
            )
        return name, detected
    text = f"{name}={agree}"
    try:
        return parse_metric(text)
    except InputError as exc:  # said of the option the user typed, not of --metric
        raise InputError(str(exc).replace(f"--metric {text!r}", f"--agree {agree!r}", 1)) from None


def measure(
    sessions: Sequence[SessionTier],
    feeds: Sequence[dict[str, np.ndarray]],
    confidence: Confidence,
    agree: str,
    signature: dict[str, Any],
) -> tuple[Measured, str]:
    """Run every tier on every sample (interleaved, so machine load hits all alike);
    agreement with the last tier is judged as :func:`agreement_spec` says, from its
    ``signature``."""
    outputs: list[list[dict[str, np.ndarray]]] = [[] for _ in sessions]
    seconds = np.zeros((len(sessions), len(feeds)))
    for tier in sessions:
        tier.run(feeds[0])  # warm-up, not timed
    for s, feed in enumerate(feeds):
        for i, tier in enumerate(sessions):
            started = time.perf_counter()
            outputs[i].append(tier.run(feed))
            seconds[i, s] = time.perf_counter() - started
    reference = outputs[-1]
    name, spec = agreement_spec(agree, reference, signature)
    specs = signature_specs(reference, signature, {name: spec})
    agreement = np.ones((len(sessions), len(feeds)))
    confidences = np.full((len(sessions), len(feeds)), np.nan)
    for i in range(len(sessions) - 1):  # the last tier is never gated
        for s in range(len(feeds)):
            started = time.perf_counter()
            confidences[i, s] = _confidence(confidence, outputs[i][s])
            seconds[i, s] += time.perf_counter() - started  # a gated request pays it too
            agreement[i, s] = compare([reference[s]], [outputs[i][s]], specs).score
    return Measured(confidences, agreement, seconds), spec.label()


def _confidence(function: Callable[[dict[str, np.ndarray]], float], outputs: dict) -> float:
    try:
        return float(function(outputs))
    except (Exception, SystemExit) as exc:  # a user function can raise, or call sys.exit
        raise SlimfleetError(
            f"the confidence function failed: {type(exc).__name__}: {first_line(exc)}"
        ) from None


def _check_options(models: Sequence[Path], deployment: Path | None, slot: str | None) -> None:
    if len(models) < 2:
        raise InputError("give at least two models: FIRST.onnx STRONGER.onnx [MORE.onnx]")
    if (deployment is None) != (slot is None):
        raise InputError("--deployment and --slot go together")
    if slot is not None:
        try:
            check_slot(slot)
        except ValueError as exc:
            raise InputError(f"--slot: {exc}") from None
    if deployment is not None and not deployment.is_file():
        raise InputError(f"--deployment {deployment}: no such file")
    if deployment is not None and slot is not None:
        check_gate_slot(deployment, slot)  # before the calibration, not after


def _function_for(tier: SessionTier, feed: dict[str, np.ndarray]) -> str:
    """The built-in confidence function for the tier's actual first float output (its
    declared shape may be wrong: ddddocr declares ``[1, seqlen]`` for ``[T, 1, C]``)."""
    outputs = tier.run(feed)
    shape = next((list(v.shape) for v in outputs.values() if v.dtype.kind == "f"), [])
    chosen = function_for_shape(shape)
    if chosen is None:
        raise InputError(
            f"--function: cannot tell a confidence function from {tier.label}'s output "
            f"shape {shape}; give one of {', '.join(BUILTINS)} or module:attr"
        )
    return chosen


def _tiers(models: Sequence[Path], function: str | None) -> tuple[list[SessionTier], list[dict]]:
    tiers, signatures = [], []
    for path in models:
        signature = io_signature(load_model(path, external_data=True))
        problem = function and check_shape(function, signature["outputs"][0]["shape"] or [])
        if problem:
            raise InputError(f"{path}: --function {problem}")
        tiers.append(SessionTier(path.name, open_session(path)))
        signatures.append(signature)
    for side in ("inputs", "outputs"):  # one request, answers judged output by output
        names = [[i["name"] for i in s[side]] for s in signatures]
        if any(n != names[0] for n in names):
            raise InputError(f"the tiers have different {side}: {names}")
    return tiers, signatures


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def chain() -> None:
    """Fallback chains: calibrate the gate between a slot's tiers."""


@chain.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="samples .npz")
@click.option(
    "--function",
    "function",
    help=f"confidence function: {', '.join(BUILTINS)} or module:attr "
    "[default: chosen by the first tier's output shape]",
)
@click.option("--budget", required=True, help="escalation budget, e.g. 15% or 0.15")
@click.option(
    "--agree",
    default="auto",
    show_default=True,
    help="how an answer agrees with the strongest: text (CTC), top1, or KIND[:OPT=V]",
)
@click.option("--deployment", type=click.Path(path_type=Path), help="deployment YAML to update")
@click.option("--slot", help="the slot whose gate is written (with --deployment)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def calibrate(
    models: tuple[Path, ...],
    data: Path,
    function: str | None,
    budget: str,
    agree: str,
    deployment: Path | None,
    slot: str | None,
    as_json: bool,
) -> None:
    """Pick the gate threshold for tiers FIRST.onnx STRONGER.onnx [MORE.onnx ...].

    Exit codes: 0 done, 1 no threshold fits the budget, 2 bad input.
    """
    share = parse_budget(budget)
    _check_options(models, deployment, slot)
    confidence = resolve_confidence(function) if function else None
    tiers, signatures = _tiers(models, function)
    samples = load_samples(load_plugins().pm.hook, data, signatures[0]["inputs"])
    feeds = samples.calibration + samples.evaluation
    if function is None or confidence is None:
        function = _function_for(tiers[0], feeds[0])
        confidence = resolve_confidence(function)
    measured, judged = measure(tiers, feeds, confidence, agree, signatures[-1])
    points = curve(measured)
    chosen = pick(points, share)
    if chosen is None:  # NaN confidences escalate at every threshold
        raise SlimfleetError(
            f"no threshold keeps escalation within {share:.1%}: the first tier's confidence "
            f"is NaN on {np.isnan(measured.confidence[0]).mean():.1%} of the samples"
        )
    gate = Gate(function, chosen.threshold)
    if deployment is not None and slot is not None:
        set_gate(deployment, slot, gate)
    lines = budget_lines(points)
    if as_json:
        doc: dict[str, Any] = {
            "gate": gate.to_dict(),
            "budget": share,
            "chosen": asdict(chosen),
            "agreement_metric": judged,
            "samples": len(feeds),
            "tiers": [str(m) for m in models],
            "curve": [{"budget": b, **asdict(p)} for b, p in lines],
            "deployment": str(deployment) if deployment else None,
            "slot": slot,
        }
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(
        f"{len(feeds)} samples, {len(models)} tiers, {function}, agreement with "
        f"{models[-1].name} by {judged}"
    )
    click.echo("budget  threshold    escalated  agreement  latency vs strongest")
    for b, p in lines:
        mark = "  <- chosen" if p == chosen else ""
        click.echo(
            f"{b:6.0%}  {p.threshold:<11.6g}  {p.escalation:8.1%}  {p.agreement:9.1%}"
            f"  {p.latency_ratio:.2f}x{mark}"
        )
    where = f"; written to {deployment} slot {slot}" if deployment else ""
    click.echo(
        f"gate: {{function: {function}, threshold: {chosen.threshold:.6g}}}: "
        f"escalates {chosen.escalation:.1%}, agrees {chosen.agreement:.1%} "
        f"at {chosen.latency_ratio:.2f}x the strongest's latency{where}"
    )
