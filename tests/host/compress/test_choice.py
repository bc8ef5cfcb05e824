"""The choice among judged candidates: pure functions over made-up figures."""

from __future__ import annotations

from typing import Any

import pytest

from slimfleet.host.compress import choice
from slimfleet.host.compress.candidate import BASELINE, REJECTED
from slimfleet.host.compress.fidelity import Fidelity, OutputFidelity


@pytest.fixture
def choose(make_candidate):
    def run(objective: str, *candidates: Any) -> choice.Choice:
        return choice.choose([make_candidate(0, 10.0, 1000, BASELINE), *candidates], objective)

    return run


def test_latency_objective_picks_the_fastest(choose, make_candidate):
    c = make_candidate
    picked = choose("latency", c(1, 8.0, 900), c(2, 5.0, 950), c(3, 4.0, 990, REJECTED))
    assert (picked.candidate.id, picked.kept_original) == (2, False)
    assert picked.reason.startswith("fastest of 2 candidates that beat the original")
    assert picked.reason.endswith("2.00x faster, 1.05x smaller")


def test_latency_ties_go_to_the_smaller(choose, make_candidate):
    assert (
        choose("latency", make_candidate(1, 5.0, 900), make_candidate(2, 5.1, 300)).candidate.id
        == 2
    )


@pytest.mark.parametrize("objective", ["latency", "size"])
def test_ties_on_both_figures_go_to_the_more_faithful(choose, make_candidate, objective):
    """Plain int8 and int8 with SmoothQuant (a few bytes more, same speed): the score
    decides, not the noise."""
    c = make_candidate
    plain, smoothed, worse = c(1, 5.0, 500), c(2, 5.1, 502), c(3, 5.05, 501)
    for candidate, score in ((plain, 0.9961), (smoothed, 1.0), (worse, 0.99)):
        candidate.fidelity = Fidelity([OutputFidelity("y", "ctc", score, 256)])
    assert choose(objective, plain, smoothed, worse).candidate.id == 2
    faster = c(4, 4.0, 500)  # clearly faster (or, by size, a tie broken by latency)
    faster.fidelity = Fidelity([OutputFidelity("y", "ctc", 0.99, 256)])
    assert choose(objective, plain, smoothed, faster).candidate.id == 4


def test_size_objective_picks_the_smallest_and_breaks_ties_by_latency(choose, make_candidate):
    c = make_candidate
    picked = choose("size", c(1, 5.0, 500), c(2, 9.0, 250), c(3, 7.0, 251))
    assert picked.candidate.id == 3
    assert picked.reason.startswith("smallest of 3 candidates")


def test_same_speed_but_smaller_beats_the_original(choose, make_candidate):
    assert choose("latency", make_candidate(1, 10.1, 500)).candidate.id == 1


def test_noise_level_gains_do_not_beat_the_original(choose, make_candidate):
    picked = choose("latency", make_candidate(1, 9.9, 1000))
    assert picked.candidate.id == 0 and picked.kept_original
    assert picked.reason.endswith("keeping the original byte for byte")


@pytest.mark.parametrize("objective", ["latency", "size"])
def test_faster_but_larger_never_wins(choose, make_candidate, objective):
    """An int8 model whose "simplification" stored weights as float: 4x larger."""
    picked = choose(objective, make_candidate(1, 5.0, 4000), make_candidate(2, 20.0, 200))
    assert picked.candidate.id == 0 and picked.kept_original


def test_a_larger_lossless_candidate_never_stands_in_for_the_original(choose, make_candidate):
    picked = choose("latency", make_candidate(1, 9.9, 4000, lossless=True))
    assert picked.candidate.id == 0
    assert "(1 accepted, 0 not)" in picked.reason


def test_a_smaller_lossless_winner_keeps_the_original_simplified(choose, make_candidate):
    picked = choose("latency", make_candidate(1, 10.0, 800, lossless=True))
    assert picked.candidate.id == 1 and picked.kept_original
    assert "losslessly simplified 1.00x" not in picked.reason
    assert picked.reason.endswith("losslessly simplified same speed, 1.25x smaller")


@pytest.mark.parametrize(
    ("figures", "text"),
    [
        ((4.22, 10.0, 259, 1000), "2.37x faster, 3.86x smaller"),
        ((12.0, 10.0, 1200, 1000), "1.20x slower, 1.20x larger"),
        ((10.0, 10.0, 1000, 1000), "same speed, same size"),
        ((None, 10.0, 500, 1000), "faster: n/a, 2.00x smaller"),
    ],
)
def test_ratios_are_written_one_way(figures, text):
    assert choice.ratio_text(*figures) == text
