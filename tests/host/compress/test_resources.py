"""resources: tree RSS, its sampled peak, and the sizes and durations of the CLI."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from slimfleet.agent.errors import InputError
from slimfleet.host.compress import resources
from slimfleet.host.compress.planning import Budget
from slimfleet.host.compress.search import compress


def test_tree_rss_counts_children():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; b = bytearray(200 << 20); time.sleep(60)"]
    )
    try:
        # Wait for the child itself to hold its 200 MiB (python starts slowly on a busy
        # machine), then the tree must count it on top of this process.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and resources.tree_rss(child.pid) < (190 << 20):
            time.sleep(0.02)
        assert resources.tree_rss(child.pid) >= 190 << 20, "the child never allocated"
        alone = psutil.Process().memory_info().rss
        with resources.PeakTreeRSS(interval=0.01) as peak:
            time.sleep(0.05)
        assert peak.bytes > alone + (150 << 20)
    finally:
        child.kill()
        child.wait()


def test_a_gone_process_has_no_rss():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert resources.tree_rss(proc.pid) == 0


@pytest.mark.parametrize(
    ("text", "value"),
    [("4GiB", 4 << 30), ("4G", 4 << 30), ("512MiB", 512 << 20), ("1.5g", 3 << 29), ("100", 100)],
)
def test_sizes(text, value):
    assert resources.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "4X", "-1G", "0", "GiB"])
def test_bad_sizes_say_what_is_expected(text):
    with pytest.raises(InputError, match=r"--max-memory .*expected a size such as 4GiB"):
        resources.parse_bytes(text)


def test_format_bytes():
    assert resources.format_bytes(4 << 30) == "4.0 GiB"
    assert resources.format_bytes(1536) == "1.5 KiB"
    assert resources.format_bytes(12) == "12 B"


def test_the_budget_guesses_from_the_original_then_learns():
    budget = Budget(seconds=100, memory=1 << 30)
    budget.learn_original(2.0)
    assert budget.candidate_cost() == 6.0
    assert budget.why_not() is None
    budget.finish_candidate(30)
    budget.finish_candidate(50)
    assert budget.candidate_cost() == 40
    assert budget.why_not(1000).startswith("time budget: ")


def test_a_candidate_deadline_caps_every_child_timeout():
    budget = Budget(seconds=1000, memory=1 << 30, candidate_timeout=5)
    assert budget.child_limits().timeout == 5
    budget.start_candidate()
    assert 0 < budget.child_limits().timeout <= 5
    assert budget.child_limits().memory <= 1 << 30


def test_a_memory_limit_the_search_itself_cannot_keep_is_refused(tmp_path):
    # 1 KiB was accepted, and the report then said "peak memory 350 MiB of 1.0 KiB"
    with pytest.raises(InputError, match=r"--max-memory 1.0 KiB: at least 512.0 MiB"):
        compress(str(tmp_path / "none.onnx"), tmp_path / "out", max_memory=1024)
    assert not (tmp_path / "out").exists()
