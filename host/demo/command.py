"""``slimfleet demo``: a pipeline, a hot swap, a fallback chain and staged rollouts, here.

One command, no broker to install, nothing beyond 127.0.0.1: it generates a two-slot
pipeline (``features`` -> ``classify``), compresses ``classify`` by measurement, signs
and publishes every version through an embedded MQTT broker to three in-process agents,
then drives them the way an operator would (the same functions as ``assign``,
``chain calibrate``, ``rollout`` and ``status``). See README "Quick start".

Bounds: each phase's request loop sends at most MAX_REQUESTS; each device has
stage.OUTCOME_TIMEOUT_S to answer a desired state (bounds of step 7: rollouts.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx

from slimfleet.agent.deployment import Deployment, SlotSpec
from slimfleet.agent.errors import SlimfleetError
from slimfleet.agent.wire import ModelRef
from slimfleet.host.chaincal import calibrate
from slimfleet.host.compress.search import compress
from slimfleet.host.demo import models
from slimfleet.host.demo.rollouts import rollouts
from slimfleet.host.demo.stage import DEVICES, GROUP, Stage
from slimfleet.host.demo.traffic import Load, Tally
from slimfleet.host.fleet.deployfile import load_deployment, write_deployment
from slimfleet.host.fleet.publish import publish_model

MARKER = ".slimfleet-demo"  # marks a work directory as the demo's own output
STEPS = 7
MAX_REQUESTS = 5000  # per request loop
SWAP_REQUESTS = 150  # pipeline requests before and after the swap (at least)
CHAIN_REQUESTS = 200
SAMPLES = 200  # calibration samples for the chain's gate
BUDGET = "20%"  # the chain's escalation budget
BAD_BUDGET_MS = 5.0  # the smoke-test latency budget published with the slow version

F1, F2, F3 = (ModelRef("features", v) for v in (1, 2, 3))
C1, C2 = ModelRef("classify", 1), ModelRef("classify", 2)

Say = Callable[[str], None]


def _prepare(workdir: Path, force: bool) -> None:
    """An empty work directory: a previous demo's output is removed, anything else only
    with ``force``."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (force or (workdir / MARKER).exists()):
            raise click.BadParameter(
                f"{workdir} is not empty and is not a previous demo's output (--force deletes it)",
                param_hint="--workdir",
            )
        if workdir.is_symlink():
            raise click.BadParameter(
                f"{workdir} is a symbolic link: not deleting where it points; name a folder",
                param_hint="--workdir",
            )
        resolved = workdir.resolve()
        for keep in (Path.cwd().resolve(), Path.home().resolve()):
            if keep == resolved or resolved in keep.parents:
                raise click.BadParameter(
                    f"{workdir} holds {keep}: not deleting it; name a folder of its own",
                    param_hint="--workdir",
                )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("written by `slimfleet demo`; it may delete this folder\n")


def _times(ratio: float | None, word: str) -> str:
    """0.25 -> '4.0x smaller'."""
    return f"{1 / ratio:.1f}x {word}" if ratio else f"? {word}"


def _answered(tally: Tally) -> str:
    counts = ", ".join(f"{m} answered {n}" for m, n in sorted(tally.answered.items()))
    return f"{tally.total} requests, {tally.failed} failed: {counts}"


def _check(tally: Tally, what: str) -> None:
    if tally.failed:
        raise SlimfleetError(f"{what}: {tally.failed} requests failed ({tally.first_error})")


def build(work: Path, say: Say, progress_bar: bool) -> dict[str, Any]:
    """Steps 1-2: the model files, samples, and classify@2 compressed from classify@1."""
    say(f"1/{STEPS} build the models: {F1}, {F2}, {C1} (fp32) and a slow build {F3}")
    files = work / "models"
    files.mkdir()
    for ref, model in (
        (F1, models.features_model(1)),
        (F2, models.features_model(2)),
        (F3, models.features_model(2, models.SLOW_STEPS)),
        (C1, models.classify_model()),
    ):
        onnx.save(model, str(files / f"{ref.name}-{ref.version}.onnx"))
    features = models.features_of(models.features_model(1), models.readings(SAMPLES, seed=3))
    np.savez(work / "samples.npz", f=features)

    say(f"2/{STEPS} compress {C1} by measurement (every candidate measured on this machine)")
    out = work / "compressed"
    bar = click.progressbar(length=1, label="    candidates") if progress_bar else None

    def progress(done: int, total: int, label: str) -> None:
        if bar is not None:
            bar.length = total
            bar.update(done - bar.pos)

    with bar if bar is not None else contextlib.nullcontext():
        report = compress(
            files / "classify-1.onnx", out, data=work / "samples.npz", progress=progress
        )
    s = report.summary
    fidelity = s.get("fidelity")
    say(
        f"    chose {s.get('chosen')}: {_times(s.get('size_ratio'), 'smaller')}, "
        f"{_times(s.get('latency_ratio'), 'faster')}, fidelity "
        f"{f'{fidelity:.3g}' if isinstance(fidelity, float | int) else fidelity} -> {C2}"
    )
    return {key: s.get(key) for key in ("chosen", "size_ratio", "latency_ratio", "fidelity")}


def publish(stage: Stage, work: Path, say: Say) -> dict[str, Any]:
    """Step 3 (after the stage is up): sign and publish every version."""
    files = work / "models"
    sources = {
        F1: files / "features-1.onnx",
        F2: files / "features-2.onnx",
        F3: files / "features-3.onnx",
        C1: files / "classify-1.onnx",
        C2: work / "compressed",
    }
    chunks = size = 0
    for ref, source in sources.items():
        budget = BAD_BUDGET_MS if ref == F3 else None
        result = publish_model(stage.fleet, source, ref.name, ref.version, max_latency_ms=budget)
        chunks, size = chunks + result.chunks, size + result.size
    say(
        f"    signed and published {', '.join(map(str, sources))}: {size / 1e6:.1f} MB "
        f"in {chunks} chunks ({F3} with a smoke-test budget of {BAD_BUDGET_MS:g} ms)"
    )
    return {"models": [str(r) for r in sources], "chunks": chunks, "bytes": size}


def serve_and_swap(stage: Stage, say: Say) -> dict[str, Any]:
    """Steps 4-5: the pipeline on every device; classify@1 -> @2 on edge-1 under load."""
    pipeline: Deployment = {"features": SlotSpec((F1,)), "classify": SlotSpec((C1,))}
    say(f"4/{STEPS} deploy the pipeline features={F1} classify={C1} to {', '.join(DEVICES)}")
    started = time.monotonic()
    stage.deploy(pipeline, list(DEVICES))
    url = stage.url(DEVICES[0])
    say(f"    all serving after {time.monotonic() - started:.1f} s; {DEVICES[0]} answers at {url}")

    say(
        f"5/{STEPS} swap slot classify from {C1} to {C2} on {DEVICES[0]} while pipeline requests run"
    )
    load = Load(url, models.readings(256, seed=5), MAX_REQUESTS)
    try:
        load.wait_for(SWAP_REQUESTS, timeout=60)
        stage.deploy({"classify": SlotSpec((C2,))}, [DEVICES[0]])
        load.wait_for(load.tally.total + SWAP_REQUESTS, timeout=60)
    finally:
        tally = load.stop()
    say(f"    {_answered(tally)}")
    _check(tally, "the swap")
    return {"requests": tally.total, "failed": tally.failed, "answered": dict(tally.answered)}


def chain(stage: Stage, work: Path, say: Say) -> dict[str, Any]:
    """Step 6: calibrate the gate (``slimfleet chain calibrate``), deploy the chain."""
    say(f"6/{STEPS} chain classify: {C2} (int8) -> {C1} (fp32), gate calibrated on samples")
    deployment_file = work / "deployment.yaml"
    write_deployment(deployment_file, {"features": SlotSpec((F1,)), "classify": SlotSpec((C2, C1))})
    args = [str(work / "compressed" / "model.onnx"), str(work / "models" / "classify-1.onnx")]
    args += ["--data", str(work / "samples.npz"), "--budget", BUDGET, "--json"]
    args += ["--deployment", str(deployment_file), "--slot", "classify"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        calibrate.main(args, prog_name="slimfleet chain calibrate", standalone_mode=False)
    result = json.loads(printed.getvalue())
    gate, chosen = result["gate"], result["chosen"]
    say(
        f"    gate {gate['function']} >= {gate['threshold']:.4g} for a {BUDGET} budget: "
        f"escalates {chosen['escalation']:.1%} of {result['samples']} samples "
        f"(written to {deployment_file.name} by `slimfleet chain calibrate`)"
    )
    stage.deploy(load_deployment(deployment_file), list(DEVICES))
    load = Load(stage.url(DEVICES[0]), models.readings(CHAIN_REQUESTS, seed=6), CHAIN_REQUESTS)
    try:
        load.wait_for(CHAIN_REQUESTS, timeout=120)
    finally:
        tally = load.stop()
    escalated = tally.answered.get(str(C1), 0)
    share = escalated / max(1, tally.total)
    say(
        f"    {tally.total} requests, {tally.failed} failed: {tally.answered.get(str(C2), 0)} "
        f"answered by {C2}, {escalated} escalated to {C1} ({share:.0%})"
    )
    _check(tally, "the chain")
    return {"gate": gate, "requests": tally.total, "failed": tally.failed, "escalated": escalated}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("slimfleet-demo"),
    show_default=True,
    help="Where models, keys, configs and the agents' stores go (a previous demo's "
    "output there is replaced).",
)
@click.option("--force", is_flag=True, help="Delete WORKDIR even if a demo did not write it.")
@click.option(
    "--json", "as_json", is_flag=True, help="Progress on stderr, a JSON summary on stdout."
)
def demo(workdir: Path, force: bool, as_json: bool) -> None:
    """Pipeline, hot swap, fallback chain and staged rollouts on this machine.

    Runs an embedded MQTT broker (no broker to install), three real agents with their
    HTTP APIs (Open Inference Protocol v2), and the host's own assign, chain calibrate,
    rollout and status code. Everything stays under WORKDIR; nothing listens beyond
    127.0.0.1; everything is stopped before it exits. Exit codes: 0 done, 1 a step
    failed, 2 bad usage.
    """
    _prepare(workdir, force)
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        # The in-process agents' warnings would interleave with the demo's lines; the
        # events they publish are shown instead (-v shows their logs too).
        logging.getLogger("slimfleet.agent").setLevel(logging.ERROR)
    started = time.monotonic()
    say: Say = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    summary: dict[str, Any] = {"workdir": str(workdir)}
    summary["compress"] = build(workdir, say, progress_bar=sys.stdout.isatty() and not as_json)
    say(f"3/{STEPS} start an embedded MQTT broker and {len(DEVICES)} agents")
    stage = Stage(workdir)
    try:
        say(f"    broker {stage.broker.url}, agents {', '.join(DEVICES)}")
        summary["publish"] = publish(stage, workdir, say)
        summary["swap"] = serve_and_swap(stage, say)
        summary["chain"] = chain(stage, workdir, say)
        say(f"7/{STEPS} roll {F2} out to group {GROUP} in 2 waves, then the slow {F3}")
        summary["rollout"] = rollouts(stage, F2, F3, say)
    finally:
        stage.close()
    summary["seconds"] = round(time.monotonic() - started, 1)
    say(f"done in {summary['seconds']} s; broker and agents stopped. Files in {workdir}/")
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
