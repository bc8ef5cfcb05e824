"""Benchmark: slimfleet's choice against fp32 and the peers on ddddocr's two models.

For ddddocr's ``common.onnx`` (Conv + LSTM OCR) and ``common_det.onnx`` (YOLO-like
detector) it generates captcha images, runs ``slimfleet compress`` with defaults (as a
user does, in a child process whose peak RSS is sampled) on one set, and judges the
original, slimfleet's choice and the peers (``peers``: onnxruntime's quantizer, NNCF,
when the ``bench`` extra is installed) on another, held-out set with the same task
metrics: for the OCR model greedy-CTC decoded text equality with fp32 (blank index 0,
as ddddocr decodes) and per-step argmax agreement, for the detector the output cosine.
Latency is the 1-thread median, runs interleaved round-robin so machine load hits all
models alike. Installs ddddocr and captcha with pip when they are missing.
Run: ``python bench/compress_bench.py [--model common] [--no-peers] [--json]``.
"""

from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import judging
import numpy as np
from benchlib import GIB, CompressRun, Row, cpu_note, format_table, session
from sidebyside import Limits, compare

PACKAGES = {"ddddocr": "ddddocr", "captcha": "captcha", "cv2": "opencv-python-headless"}
CHARS = "abcdefghijkmnpqrstuvwxyz23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
OCR_HEIGHT = 64  # ddddocr resizes to 64 pixels high, keeps the aspect ratio, grayscale
CAPTCHA_SIZE = (160, 60)  # fixed, so every OCR sample is 64x170 and they stack
DET_SIDE = 416  # ddddocr pads BGR images to 416x416 with value 114
DET_CAPTCHA_SIZE = (320, 160)


def ensure_packages() -> None:
    """pip-install what the benchmark needs into this interpreter when it is missing."""
    missing = [pip for module, pip in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        click.echo(f"installing {', '.join(missing)} ...", err=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


class _SeededSecrets:
    """captcha draws from ``secrets``; this stand-in makes the images reproducible."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._random.randrange(n)

    def randbits(self, k: int) -> int:
        return self._random.getrandbits(k)

    def choice(self, items):
        return self._random.choice(items)


def _captchas(count: int, seed: int, size: tuple[int, int]):
    import captcha.image

    captcha.image.secrets = _SeededSecrets(seed)
    texts = random.Random(seed + 1)
    generator = captcha.image.ImageCaptcha(width=size[0], height=size[1])
    for _ in range(count):
        text = "".join(texts.choice(CHARS) for _ in range(texts.randint(4, 6)))
        yield generator.generate_image(text)


def ocr_samples(count: int, seed: int) -> list[np.ndarray]:
    """``[1, 1, 64, 170]`` float inputs for common.onnx, as ddddocr preprocesses them."""
    samples = []
    for image in _captchas(count, seed, CAPTCHA_SIZE):
        width = int(image.size[0] * OCR_HEIGHT / image.size[1])
        gray = image.resize((width, OCR_HEIGHT)).convert("L")
        samples.append((np.asarray(gray, np.float32) / 255.0)[None, None])
    return samples


def det_samples(count: int, seed: int) -> list[np.ndarray]:
    """``[1, 3, 416, 416]`` inputs for common_det.onnx, as ddddocr preprocesses them."""
    import cv2

    samples = []
    for image in _captchas(count, seed, DET_CAPTCHA_SIZE):
        bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
        scale = min(DET_SIDE / bgr.shape[0], DET_SIDE / bgr.shape[1])
        resized = cv2.resize(
            bgr, (int(bgr.shape[1] * scale), int(bgr.shape[0] * scale)), cv2.INTER_LINEAR
        )
        padded = np.full((DET_SIDE, DET_SIDE, 3), 114, np.uint8)
        padded[: resized.shape[0], : resized.shape[1]] = resized
        samples.append(np.ascontiguousarray(padded.transpose(2, 0, 1), np.float32)[None])
    return samples


@dataclass(frozen=True)
class Case:
    file: str
    what: str
    samples: Callable[[int, int], list[np.ndarray]]
    judges: tuple[judging.Judge, ...]
    """The first is the task metric the goal is on."""
    search_samples: int
    goals: tuple[float, float, float]
    """At least this much faster and smaller than fp32, and this task metric."""


CASES = {
    "common": Case(
        "common.onnx",
        "Conv + LSTM OCR",
        ocr_samples,
        (judging.ctc_text(time_axis=0, blank=0), judging.step_agreement()),
        96,
        (2.0, 3.0, 0.98),
    ),
    "det": Case(
        "common_det.onnx",
        "YOLO-like detector",
        det_samples,
        (judging.cosine(),),
        64,
        (2.0, 3.5, 0.99),
    ),
}


def bench(name: str, case: Case, limits: Limits, test_count: int, workdir: Path):
    import ddddocr

    source = Path(ddddocr.__file__).parent / case.file
    input_name = session(source).get_inputs()[0].name
    search = [{input_name: x} for x in case.samples(case.search_samples, 1)]
    held_out = [{input_name: x} for x in case.samples(test_count, 2)]
    return compare(case.file, source, search, held_out, case.judges, limits, workdir)


def show(case: Case, rows: list[Row], run: CompressRun, test_count: int) -> None:
    click.echo(f"\n{case.file} ({case.what}): {test_count} held-out captchas, 1 thread")
    for line in format_table(rows):
        click.echo(f"  {line}")
    ours = next(r for r in rows if r.variant == "slimfleet")
    if ours.error:
        return
    base = rows[0]
    faster, smaller = base.latency_ms / ours.latency_ms, base.size_mb / ours.size_mb
    metric = float(ours.scores[0].split(" of ")[0].split()[-1])
    want = case.goals
    met = [faster >= want[0], smaller >= want[1], metric >= want[2]]
    click.echo(
        f"  goals: >= {want[0]}x faster {'met' if met[0] else 'MISSED'}, >= {want[1]}x smaller "
        f"{'met' if met[1] else 'MISSED'}, {case.judges[0].name} >= {want[2]} "
        f"{'met' if met[2] else 'MISSED'}"
    )
    click.echo("  its search (on the search's own evaluation samples):")
    for c in run.report.get("candidates", []):
        median = (c.get("latency_ms") or {}).get("median")
        score = (c.get("fidelity") or {}).get("score")
        size = c.get("size_bytes")
        click.echo(
            f"    #{c['id']:<3}{c['status']:<9}{_num(median, '.2f', 'ms'):>10}"
            f"{_num(size and size / 1e6, '.1f', 'MB'):>9}"
            f"{_num(score, '.4f', ''):>8}  {c['label'][:90]}"
        )


def _num(value: float | None, spec: str, unit: str) -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    "names",
    multiple=True,
    type=click.Choice(sorted(CASES)),
    help="Benchmark only this model (repeatable); default: all.",
)
@click.option("--rounds", default=200, show_default=True, help="Timed runs per model.")
@click.option(
    "--test-samples",
    default=250,
    show_default=True,
    help="Held-out captchas for the task metric (and latency inputs).",
)
@click.option("--no-peers", is_flag=True, help="Skip the onnxruntime/NNCF peers.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON at the end.")
def main(names: tuple[str, ...], rounds: int, test_samples: int, no_peers: bool, as_json: bool):
    """Compare slimfleet's choice with fp32 and the peers on ddddocr's models."""
    ensure_packages()
    click.echo(f"compress bench: {cpu_note()}", err=True)
    limits = Limits(rounds, 900, 600, 8 * GIB, peers=not no_peers)
    everything: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="slimfleet-bench-") as tmp:
        for name in names or tuple(CASES):
            case = CASES[name]
            workdir = Path(tmp) / name
            workdir.mkdir()
            rows, run = bench(name, case, limits, test_samples, workdir)
            show(case, rows, run, test_samples)
            everything += rows
    if as_json:
        click.echo(json.dumps([asdict(r) for r in everything], indent=1))


if __name__ == "__main__":
    main()
