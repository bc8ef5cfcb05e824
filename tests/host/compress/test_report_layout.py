"""report.html as a browser lays it out: headless Chromium, when it is installed.

A script injected into a copy of the page measures what a person would see: that no two
chart labels overlap, and that with every row's recipe expanded the fidelity and
metrics columns still sit inside a 1280-pixel window. A screenshot is kept beside the
page for a look by eye (pytest's tmp dir).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from slimfleet.host.compress import reporthtml

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WIDTH = 1280
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--window-size={WIDTH},1600",
]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")

MEASURE = """<script>
const boxes = [...document.querySelectorAll('svg text.label')].map(t => t.getBoundingClientRect());
let overlaps = 0;
for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
  const a = boxes[i], b = boxes[j];
  if (a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom) overlaps++;
}
document.querySelectorAll('details').forEach(d => d.open = true);
const heads = [...document.querySelectorAll('table')[0].querySelectorAll('th')];
const right = name => heads.find(h => h.textContent.startsWith(name)).getBoundingClientRect().right;
document.title = 'LAYOUT' + JSON.stringify({labels: boxes.length, overlaps,
  fidelity: right('fidelity'), metrics: right('metrics'), width: window.innerWidth});
</script>"""


def _candidate(i: int, size: float, latency: float, status: str) -> dict:
    notes = (
        "quantized 212 MatMul, 48 Conv; kept /encoder/layer.3/attention/self/query in float " * 3
    )
    return {
        "id": i,
        "label": f"int8_recipe_{i} + fallback: {i} nodes in float",
        "pipeline": "normalize[opset=13] > simplify[check_runs=3] > quantize_static["
        + "x" * 120
        + "]",
        "status": status,
        "reason": "fidelity 0.9912 within budget; 2.37x faster, 3.86x smaller " * 2,
        "size_bytes": size,
        "latency_ms": {"median": latency, "p90": latency * 1.1},
        "load_ms": 12.0,
        "peak_memory_bytes": 50e6,
        "fidelity": {
            "score": 0.995,
            "problem": None,
            "outputs": {
                "logits": {
                    "metric": "ctc:blank=0,batch_axis=1",
                    "score": 0.995,
                    "samples": 200,
                    "interval": [0.972, 0.999],
                    "interval_method": "wilson",
                },
            },
        },
        "metrics": {"ctc_text": 0.99},
        "undecided": [],
        "steps": [{"pass": "quantize_static", "auto": False, "status": "applied", "notes": notes}],
    }


def _doc() -> dict:
    # Twelve candidates crowded around the same size and latency: labels would collide.
    statuses = ["baseline", *(["accepted", "rejected"] * 6)][:12]
    candidates = [
        _candidate(i, 6e6 + (i % 4) * 0.05e6, 4.0 + (i % 3) * 0.04, s)
        for i, s in enumerate(statuses)
    ]
    candidates[0].update(size_bytes=20e6, latency_ms={"median": 9.0, "p90": 9.5})
    return {
        "model": {"path": "/models/common.onnx"},
        "warnings": [],
        "summary": {"size_bytes": 6e6, "latency_ms": 4.0, "fidelity": 0.995,
                    "fidelity_budget": 0.99, "objective": "latency", "threads": 1,
                    "ratios": "2.25x faster, 3.33x smaller"},
        "choice": {"candidate": 1, "label": candidates[1]["label"], "reason": "fastest"},
        "samples": {"source": "data.npz", "evaluation": 200, "calibration": 64},
        "elapsed_seconds": 120.0,
        "candidates": candidates,
        "sections": [],
        "slimfleet_version": "test",
    }  # fmt: skip


def _layout(page: Path, tmp_path: Path) -> dict:
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.search(r"<title>LAYOUT(.*?)</title>", dom)
    assert found, dom[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"'))


def test_chart_labels_do_not_overlap_and_figures_stay_in_view(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(reporthtml.to_html(_doc()))
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    layout = _layout(probe, tmp_path)
    assert layout["labels"] == 12
    assert layout["overlaps"] == 0, layout
    assert layout["metrics"] <= layout["width"], layout
    assert layout["fidelity"] <= layout["width"], layout
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'shot'}", f"--screenshot={shot}",
         page.as_uri()],
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    assert shot.stat().st_size > 10_000
