"""Benchmark: slimfleet's choice against fp32 and onnxruntime's quantize_dynamic defaults.

For ddddocr's ``common.onnx`` (Conv + LSTM OCR) and ``common_det.onnx`` (YOLO-like
detector) it generates captcha images, runs ``slimfleet compress`` in-process on one
set and measures the three models on another, held-out set with the same code:
file size, 1-thread latency median (runs interleaved round-robin so machine load hits
all three alike) and fidelity against fp32 (argmax agreement per position for the
OCR model, mean output cosine for the detector). Installs ddddocr and captcha with
pip when they are missing. Run: ``python bench/compress_bench.py [--model common]``.
"""

from __future__ import annotations

import importlib
import logging
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

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


def argmax_agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    hits = sum(
        int(np.sum(r.argmax(-1) == c.argmax(-1))) for r, c in zip(reference, candidate, strict=True)
    )
    return hits / sum(r.size // r.shape[-1] for r in reference)


def mean_cosine(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    scores = []
    for r, c in zip(reference, candidate, strict=True):
        r64, c64 = r.astype(np.float64).ravel(), c.astype(np.float64).ravel()
        scores.append(float(r64 @ c64 / (np.linalg.norm(r64) * np.linalg.norm(c64))))
    return float(np.mean(scores))


@dataclass(frozen=True)
class Case:
    file: str
    what: str
    samples: Callable[[int, int], list[np.ndarray]]
    fidelity_name: str
    fidelity: Callable[[list[np.ndarray], list[np.ndarray]], float]
    search_samples: int
    goals: tuple[float, float, float]
    """At least this much faster and smaller than fp32, and this fidelity."""


CASES = {
    "common": Case(
        "common.onnx",
        "Conv + LSTM OCR",
        ocr_samples,
        "argmax agreement",
        argmax_agreement,
        96,
        (2.0, 3.0, 0.99),
    ),
    "det": Case(
        "common_det.onnx",
        "YOLO-like detector",
        det_samples,
        "output cosine",
        mean_cosine,
        64,
        (2.0, 3.5, 0.99),
    ),
}


def session(path: Path):
    """A one-thread, sequential CPU session: the options the agent serves with."""
    from slimfleet.agent.runtime import open_session

    return open_session(path, 1)


def latencies_ms(paths: dict[str, Path], feeds: list[dict], rounds: int) -> dict[str, float]:
    """Median latency per model, timing one run of each in turn, ``rounds`` times."""
    sessions = {label: session(path) for label, path in paths.items()}
    for s in sessions.values():
        for feed in feeds[:3]:
            s.run(None, feed)
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for i in range(rounds):
        feed = feeds[i % len(feeds)]
        for label, s in sessions.items():
            started = time.perf_counter()
            s.run(None, feed)
            times[label].append(time.perf_counter() - started)
    return {label: 1000 * float(np.median(t)) for label, t in times.items()}


def ort_dynamic_defaults(model: Path, target: Path) -> None:
    """What a user gets from onnxruntime by hand (its "consider pre-processing" warning
    silenced)."""
    from onnxruntime.quantization import quantize_dynamic

    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(model, target)
    finally:
        logging.disable(logging.NOTSET)


def run_slimfleet(model: Path, data: Path, outdir: Path) -> dict:
    """slimfleet compress through its library API; returns report.json's document."""
    from slimfleet.host.compress.search import compress

    def progress(done: int, total: int, label: str) -> None:
        click.echo(f"  [{done}/{total}] {label}", err=True)

    report = compress(
        model, outdir, data=data, fidelity=0.99, objective="latency", threads=1, progress=progress
    )
    return report.data


def bench(name: str, case: Case, rounds: int, test_count: int, workdir: Path) -> dict:
    import ddddocr

    source = Path(ddddocr.__file__).parent / case.file
    input_name = session(source).get_inputs()[0].name
    search_data = workdir / f"{name}_search.npz"
    np.savez(search_data, **{input_name: np.stack(case.samples(case.search_samples, seed=1))})
    test = [{input_name: x} for x in case.samples(test_count, seed=2)]

    paths = {"fp32": source, "ORT dynamic defaults": workdir / f"{name}_ort.onnx"}
    ort_dynamic_defaults(source, paths["ORT dynamic defaults"])
    started = time.monotonic()
    report = run_slimfleet(source, search_data, workdir / f"{name}_slimfleet")
    search_seconds = time.monotonic() - started
    paths["slimfleet"] = workdir / f"{name}_slimfleet" / "model.onnx"

    reference = [session(source).run(None, f)[0] for f in test]
    rows = {}
    for label, path in paths.items():
        s = session(path)
        outputs = [s.run(None, f)[0] for f in test]
        rows[label] = {
            "size_mb": path.stat().st_size / 1e6,
            "fidelity": case.fidelity(reference, outputs),
        }
    for label, ms in latencies_ms(paths, test, rounds).items():
        rows[label]["latency_ms"] = ms
    return {"rows": rows, "search_seconds": search_seconds, "report": report}


def show(name: str, case: Case, result: dict, test_count: int) -> None:
    rows = result["rows"]
    click.echo(f"\n{case.file} ({case.what}): {test_count} held-out captchas, 1 thread")
    click.echo(f"  {'model':<22}{'size MB':>9}{'latency ms':>12}  {case.fidelity_name}")
    for label, row in rows.items():
        click.echo(
            f"  {label:<22}{row['size_mb']:>9.1f}{row['latency_ms']:>12.2f}  {row['fidelity']:.4f}"
        )
    fp32, ort_, ours = rows["fp32"], rows["ORT dynamic defaults"], rows["slimfleet"]
    faster, smaller = fp32["latency_ms"] / ours["latency_ms"], fp32["size_mb"] / ours["size_mb"]
    click.echo(
        f"  slimfleet/fp32: {faster:.2f}x faster, {smaller:.2f}x smaller; "
        f"slimfleet/ORT-defaults: {ort_['latency_ms'] / ours['latency_ms']:.2f}x faster, "
        f"{ort_['size_mb'] / ours['size_mb']:.2f}x smaller"
    )
    want = case.goals
    met = [faster >= want[0], smaller >= want[1], ours["fidelity"] >= want[2]]
    click.echo(
        f"  goals: >= {want[0]}x faster {'met' if met[0] else 'MISSED'}, >= {want[1]}x smaller "
        f"{'met' if met[1] else 'MISSED'}, {case.fidelity_name} >= {want[2]} "
        f"{'met' if met[2] else 'MISSED'}; search took {result['search_seconds']:.0f} s"
    )
    report = result["report"]
    click.echo(f"  slimfleet chose: {report['summary']['chosen']}")
    click.echo("  its search (latency on the search's own evaluation samples):")
    for c in report["candidates"]:
        median = (c["latency_ms"] or {}).get("median")
        score = (c["fidelity"] or {}).get("score")
        click.echo(
            f"    #{c['id']:<3}{c['status']:<9}{_num(median, '.2f', 'ms'):>10}"
            f"{_num(c['size_bytes'] and c['size_bytes'] / 1e6, '.1f', 'MB'):>9}"
            f"{_num(score, '.4f', ''):>8}  {c['label'][:90]}"
        )


def _num(value: float | None, spec: str, unit: str) -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


@click.command()
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
    default=100,
    show_default=True,
    help="Held-out captchas for fidelity (and latency inputs).",
)
def main(names: tuple[str, ...], rounds: int, test_samples: int) -> None:
    """Compare slimfleet's choice with fp32 and ORT quantize_dynamic defaults."""
    ensure_packages()
    with tempfile.TemporaryDirectory(prefix="slimfleet-bench-") as tmp:
        for name in names or tuple(CASES):
            case = CASES[name]
            result = bench(name, case, rounds, test_samples, Path(tmp))
            show(name, case, result, test_samples)


if __name__ == "__main__":
    main()
