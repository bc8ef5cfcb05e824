"""``slimfleet compress``, ``slimfleet passes`` and ``slimfleet inspect``: thin click layers."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from slimfleet.agent.cli_runner import interrupt_on_sigterm
from slimfleet.agent.config import MAX_THREADS
from slimfleet.host.compress import outdir
from slimfleet.host.compress.data import parse_input_shape, show_shape
from slimfleet.host.compress.evaluate import EvalSettings
from slimfleet.host.compress.metricspec import parse_metric
from slimfleet.host.compress.modelfile import describe, load_model
from slimfleet.host.compress.reporthtml import output_line, undecided_notes
from slimfleet.host.compress.resources import format_bytes, parse_bytes
from slimfleet.host.compress.search import OBJECTIVES
from slimfleet.host.compress.search import compress as run_compress
from slimfleet.host.plugins import load_plugins
from slimfleet.host.units import FiniteFloat, parse_duration

log = logging.getLogger(__name__)


def _print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))


class _OutputDir(click.Path):
    """A directory path that is not empty text: ``-o ""`` would be the current directory."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path (use -o . for the current directory)", param, ctx)
        return super().convert(value, param, ctx)


@click.command()
@click.argument("model")
@click.option(
    "-o",
    "--outdir",
    "out",
    required=True,
    type=_OutputDir(path_type=Path, file_okay=False),
    help="Directory for model.onnx, report.json, report.html and sample.npz.",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="Samples: a .npz (keys = input names, axis 0 = samples) or a directory of .npz "
    "files, one sample each. Without it, random inputs (fidelity then means little).",
)
@click.option(
    "--passes",
    metavar="RECIPE",
    help="Run one recipe instead of the search, e.g. "
    "'simplify,quantize_dynamic[op_types=MatMul+LSTM]'. See 'slimfleet passes'.",
)
@click.option(
    "--fidelity",
    type=FiniteFloat(0, 1, min_open=True),
    default=0.99,
    show_default=True,
    help="Lowest fidelity accepted (argmax agreement or cosine per output, task metrics).",
)
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    default="latency",
    show_default=True,
    help="What the chosen model minimises among those inside the budget.",
)
@click.option(
    "--threads",
    type=click.IntRange(1, MAX_THREADS),
    default=1,
    show_default=True,
    help="onnxruntime intra-op threads when measuring (match the device; more than this "
    "machine's CPUs measures contention, not the model).",
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME:DIMS",
    help="Shape of an input with dynamic dims for random inputs, e.g. x:1x3x224x224. "
    "Repeat per input.",
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    metavar="OUTPUT=KIND",
    help="How to judge an output instead of the detected metric: top1, "
    "ctc[:blank=N,labels=FILE,case=insensitive], steps, iou[:threshold=T], "
    "binary[:threshold=T], cosine, exact or ignore, e.g. logits=ctc:blank=0 (labels: "
    "what each class spells, a JSON list or a line each; texts then compare as "
    "strings). Repeat per output.",
)
@click.option(
    "--force", is_flag=True, help="Write into a non-empty OUTDIR that holds no earlier output."
)
@click.option(
    "--max-memory",
    default="4GiB",
    show_default=True,
    metavar="SIZE",
    help="Peak RSS of the whole process tree (this process and every pass and evaluation "
    "process it starts). A child that goes over is killed and its candidate fails; "
    "batches are planned to fit. E.g. 4GiB, 2G, 512MiB.",
)
@click.option(
    "--time-budget",
    default="5m",
    show_default=True,
    metavar="DURATION",
    help="Wall time the search plans within: candidates, fallback variants and the final "
    "latency race that would not fit are skipped, with the reason in the report. Exceeded "
    "by at most one candidate's timeout. E.g. 5m, 90s, 1h.",
)
@click.option(
    "--train-budget",
    default=None,
    metavar="DURATION",
    help="Accuracy recovery (needs pip install 'slimfleet[train]'): when every "
    "post-training int8 candidate missed the fidelity budget, train the best one "
    "(quantization-aware, against the original on the calibration samples) for this "
    "long; added to --time-budget. Off by default. E.g. 10m.",
)
@click.option(
    "--quick", is_flag=True, help="Few latency repeats: a faster, noisier search for trials."
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def compress(
    model: str,
    out: Path,
    data: Path | None,
    passes: str | None,
    fidelity: float,
    objective: str,
    threads: int,
    input_shapes: tuple[str, ...],
    metrics: tuple[str, ...],
    force: bool,
    max_memory: str,
    time_budget: str,
    train_budget: str | None,
    quick: bool,
    as_json: bool,
) -> None:
    """Find the best compressed MODEL inside the fidelity budget, by measurement.

    MODEL is an ONNX file, or a model a front-end converts first (checked against its
    framework on --data): a PyTorch .pt (TorchScript) or .pt2 (exported program), a
    Paddle inference directory, or module:attr naming an nn.Module or a fitted
    scikit-learn estimator (a function or class there is called to build it).

    Every registered recipe (or the one given with --passes) becomes a candidate that
    is measured in its own process against the original on held-out samples; quantized
    candidates that miss the budget get per-layer fallback variants. The fastest (or
    smallest) candidate that keeps the budget and is not slower than the original is
    written to OUTDIR/model.onnx; when none beats the original, the original is kept.
    """
    interrupt_on_sigterm()  # its evaluation worker must not outlive a SIGTERM
    shapes = dict(parse_input_shape(text) for text in input_shapes)
    judged = dict(parse_metric(text) for text in metrics)
    memory, seconds = parse_bytes(max_memory), parse_duration(time_budget, "--time-budget")
    training = parse_duration(train_budget, "--train-budget") if train_budget else None
    settings = EvalSettings.quick() if quick else EvalSettings()
    with contextlib.ExitStack() as stack:
        bars: list[Any] = []

        def progress(done: int, total: int, label: str) -> None:
            if not sys.stderr.isatty():  # a log or a CI job: one line per step, unless -q
                if log.isEnabledFor(logging.WARNING):
                    click.echo(f"[{done}/{total}] {label}", err=True)
                return
            if not bars:  # started on the first report, so input errors print alone
                bar = click.progressbar(
                    length=max(total, 1), label="compress", file=sys.stderr, item_show_func=str
                )
                bars.append(stack.enter_context(bar))
            bars[0].length = max(total, 1)
            bars[0].update(done - bars[0].pos, label[:60])

        result = run_compress(
            model,
            out,
            data=data,
            passes=passes,
            fidelity=fidelity,
            objective=objective,
            threads=threads,
            input_shapes=shapes,
            metrics=judged,
            progress=progress,
            settings=settings,
            force=force,
            max_memory=memory,
            time_budget=seconds,
            train_budget=training,
        )
    doc = result.data
    if as_json:
        _print_json(
            {
                "outdir": str(result.outdir),
                "files": {
                    name: str(result.outdir / name)
                    for name in (
                        outdir.MODEL,
                        outdir.REPORT_JSON,
                        outdir.REPORT_HTML,
                        outdir.SAMPLE,
                    )
                },
                "summary": doc["summary"],
                "choice": doc["choice"],
                "warnings": doc["warnings"],
                "resources": doc["resources"],
                "candidates": [
                    {
                        "id": c["id"],
                        "label": c["label"],
                        "status": c["status"],
                        "reason": c["reason"],
                        "size_bytes": c["size_bytes"],
                        "latency_ms": (c["latency_ms"] or {}).get("median"),
                        "fidelity": (c["fidelity"] or {}).get("score"),
                        "undecided": c["undecided"],
                    }
                    for c in doc["candidates"]
                ],
            }
        )
        return
    _print_summary(doc, result.outdir)


def _print_summary(doc: dict[str, Any], out: Path) -> None:
    summary, choice = doc["summary"], doc["choice"]
    counts: dict[str, int] = {}
    for c in doc["candidates"][1:]:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"
    click.echo(f"{len(doc['candidates']) - 1} candidates ({tally}) in {doc['elapsed_seconds']} s")
    used = doc["resources"]
    click.echo(
        f"  peak memory {format_bytes(used['peak_tree_rss_bytes'])} of "
        f"{format_bytes(used['max_memory_bytes'])} (process tree); time budget "
        f"{used['time_budget_seconds']:g} s"
    )
    if choice["kept_original"]:
        click.secho("Kept the original: nothing beat it inside the budget.", bold=True)
    click.secho(f"chosen: #{choice['candidate']} {choice['label']}", bold=True)
    original = summary["original"]
    click.echo(
        f"  {summary['ratios']}: size {original['size_bytes'] / 1e6:.2f} MB -> "
        f"{summary['size_bytes'] / 1e6:.2f} MB, latency {original['latency_ms']:.3f} ms -> "
        f"{summary['latency_ms']:.3f} ms, fidelity {summary['fidelity']:.4f} "
        f"(budget {summary['fidelity_budget']})"
    )
    click.echo(f"  why: {choice['reason']}")
    chosen = doc["candidates"][choice["candidate"]]
    for name, output in (chosen["fidelity"] or {}).get("outputs", {}).items():
        click.echo(f"  judged {output_line(name, output)}")
    for text in undecided_notes(doc):
        click.secho(f"note: {text}", fg="yellow", err=True)
    click.echo(f"wrote {out}/{{model.onnx, report.json, report.html, sample.npz}}")
    for warning in doc["warnings"]:
        click.secho(f"warning: {warning}", fg="yellow", bold=True, err=True)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the passes as JSON.")
def passes(as_json: bool) -> None:
    """List the compression passes registered by built-in and installed plugins."""
    plugins = load_plugins()
    rows = [
        {
            "name": p.name,
            "description": p.description,
            "plugin": plugins.passes.plugin_of(p.name),
            "lossless": p.lossless,
            "options": [
                {
                    "name": o.name,
                    "type": o.type.__name__,
                    "default": o.default,
                    "help": o.help,
                    "choices": list(o.choices) if o.choices else None,
                }
                for o in p.options
            ],
        }
        for p in sorted(plugins.passes, key=lambda p: p.name)
    ]
    if as_json:
        _print_json(rows)
        return
    for row in rows:
        click.secho(row["name"], bold=True, nl=False)
        click.echo(f"  ({row['plugin']})\n    {row['description']}")
        for opt in row["options"]:
            choices = f" [{'|'.join(map(str, opt['choices']))}]" if opt["choices"] else ""
            click.echo(f"    {opt['name']}={opt['default']!r}{choices}: {opt['help']}")
    recipes = ", ".join(r.name for r in plugins.recipes) or "none"
    click.echo(f"\nrecipes searched by default: {recipes}")


@click.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect(model: Path, as_json: bool) -> None:
    """Describe MODEL: size, opset, inputs and outputs, ops, parameters, Constant weights."""
    info = describe(load_model(model, external_data=True), model.stat().st_size)
    if as_json:
        _print_json({"path": str(model), **info})
        return
    producer = f", {info['producer']}" if info["producer"] else ""
    click.echo(
        f"{model}: {info['size_bytes'] / 1e6:.2f} MB, opset {info['opset']}, "
        f"IR {info['ir_version']}{producer}"
    )
    for kind in ("inputs", "outputs"):
        click.echo(f"{kind}:")
        for value in info[kind]:
            click.echo(f"  {value['name']}  {value['dtype']}  {show_shape(value['shape'])}")
    click.echo(f"parameters: {info['parameters']:,} ({info['initializers']} initializers)")
    ops = ", ".join(f"{op} {n}" for op, n in info["ops"].items())
    click.echo(f"ops ({info['nodes']} nodes): {ops}")
    constants = info["constant_weights"]
    if constants:
        click.echo(
            f"weights stored as Constant nodes: {len(constants)} "
            "(the normalize pass moves them to initializers so quantizers see them)"
        )
    else:
        click.echo("weights stored as Constant nodes: none")
