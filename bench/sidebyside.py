"""One model side by side: the original, ``slimfleet compress``'s choice and the peers,
judged on the same held-out samples with the same task metrics and timed interleaved.

``slimfleet compress`` gets the search samples through ``--data`` (it splits them into
its own calibration and evaluation sets); the peers calibrate on the same search
samples, and NNCF's accuracy control validates on them. No model ever sees the held-out
samples before it is judged on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
from benchlib import (
    GIB,
    CompressRun,
    Feed,
    Row,
    latencies_ms,
    outputs_of,
    run_bounded,
    run_compress,
    size_mb,
    write_samples,
)
from judging import Judge
from peers import PEERS


@dataclass(frozen=True)
class Limits:
    rounds: int
    """Interleaved timing rounds (fewer when one round is slow; see latencies_ms)."""
    compress_timeout_s: float
    peer_timeout_s: float
    max_rss: int
    """Bytes of RSS of a compress or peer process tree past which it is killed."""
    peers: bool = True


def compare(
    name: str,
    model: Path,
    search: Sequence[Feed],
    held_out: Sequence[Feed],
    judges: Sequence[Judge],
    limits: Limits,
    workdir: Path,
    compress_args: Sequence[str] = (),
    search_judge: Judge | None = None,
) -> tuple[list[Row], CompressRun]:
    """Rows for one model (original, slimfleet, then each peer) and compress's run;
    ``compress_args`` are added to compress's command line (e.g. ``--fidelity``).
    ``search_judge``: the task metric on the search samples, for the peers that validate
    on them (default ``judges[0]``; a judge built for the held-out samples, such as a
    tagger's real lengths, cannot judge others)."""
    reference = outputs_of(model, held_out)

    def judged(path: Path) -> list[str]:
        candidate = outputs_of(path, held_out)
        return [f"{j.name} {j(reference, candidate).show()}" for j in judges]

    rows = [Row(name, "original", size_mb(model), scores=judged(model))]
    paths = {"original": model}
    click.echo(f"  slimfleet compress ({len(search)} search samples) ...", err=True)
    run = run_compress(
        model,
        write_samples(search, workdir / "search"),
        workdir / "slimfleet",
        timeout_s=limits.compress_timeout_s,
        max_rss=limits.max_rss,
        extra_args=compress_args,
    )
    row = Row(name, "slimfleet", peak_rss=run.watched.peak_rss, seconds=run.watched.seconds)
    if run.model is None:
        row.error = (
            f"{run.watched.error} (peak RSS {run.watched.peak_rss / GIB:.2f} GiB, "
            f"{run.watched.seconds:.0f} s)"
        )
    else:
        row.size_mb, row.scores, row.choice = size_mb(run.model), judged(run.model), run.choice
        paths["slimfleet"] = run.model
    rows.append(row)
    if limits.peers:
        judge = search_judge or judges[0]
        rows += _peer_rows(name, model, judge, search, limits, workdir, paths, judged)
    timings = latencies_ms(paths, held_out, limits.rounds)
    for row in rows:
        row.latency_ms = timings.get(row.variant, row.latency_ms)
    return rows, run


def _peer_rows(name, model, judge, calibration, limits, workdir, paths, judged) -> list[Row]:
    calibration_reference = outputs_of(model, calibration)

    def validate(outputs) -> float:
        return judge(calibration_reference, outputs).value

    rows = []
    for peer in PEERS:
        row = Row(name, peer.name)
        rows.append(row)
        if reason := peer.missing():
            row.error = reason
            continue
        click.echo(f"  peer {peer.name} ...", err=True)
        target = workdir / f"peer-{len(rows)}.onnx"
        watched = run_bounded(
            lambda peer=peer, target=target: peer.build_in(
                workdir, model, calibration, target, validate
            ),
            timeout_s=limits.peer_timeout_s,
            max_rss=limits.max_rss,
        )
        row.peak_rss, row.seconds = watched.peak_rss, watched.seconds
        if watched.error:
            row.error = watched.error
            continue
        try:
            row.size_mb, row.scores = size_mb(target), judged(target)
        except Exception as exc:  # the peer wrote a model onnxruntime cannot run
            row.error = f"its model does not run: {' '.join(str(exc).split())[:200]}"
            continue
        paths[peer.name] = target
    return rows
