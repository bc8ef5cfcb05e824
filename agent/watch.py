"""The watch policy: whether a freshly swapped-in deployment regressed, as pure functions.

After a swap the replaced deployment stays loaded for ``window_s`` seconds. The
policy compares, slot by slot, the new deployment's recent requests with what the same
slot served before the swap. Only the model's own failures count as errors (the
serving layer never records client errors here). Nothing in this module locks, sleeps
or keeps state: the caller hands it sample arrays and the time elapsed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

#: A failed request in a latency sample array.
FAILED = -1.0


@dataclass(frozen=True)
class WatchPolicy:
    """When to switch back after a swap.

    For ``window_s`` seconds after a swap the previous deployment stays loaded. Once a
    slot of the new one has served ``min_requests`` requests, the deployment is
    abandoned if that slot's error rate exceeds the slot's rate before the swap by more
    than ``max_error_rate``, or its p95 latency exceeds ``max_p95_ratio`` times the p95
    before (when the slot served at least ``min_requests`` successful requests before)
    and by more than ``LATENCY_NOISE_S`` (a sub-millisecond model's p95 doubles under any
    burst of requests, so a ratio alone would let a client flood veto a good swap).
    ``window_s=0`` turns the watch off.
    """

    window_s: float = 30.0
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_p95_ratio: float = 1.5


LATENCY_NOISE_S = 0.002  # a p95 rise below this is scheduling noise, never a regression


@dataclass(frozen=True)
class Baseline:
    """One slot's figures before the swap."""

    error_rate: float = 0.0
    p95_s: float | None = None


def baseline(policy: WatchPolicy, samples: np.ndarray) -> Baseline:
    """The baseline of a slot from its recent samples (latency in s, FAILED for errors)."""
    if samples.size < policy.min_requests:
        return Baseline()
    ok = samples[samples >= 0]
    p95 = float(np.percentile(ok, 95)) if ok.size >= policy.min_requests else None
    return Baseline(float((samples < 0).mean()), p95)


def regression(policy: WatchPolicy, samples: np.ndarray, base: Baseline) -> str | None:
    """Why one slot of the new deployment is worse than before, or None."""
    if samples.size < policy.min_requests:
        return None
    error_rate = float((samples < 0).mean())
    if error_rate - base.error_rate > policy.max_error_rate:
        return (
            f"error rate {error_rate:.1%} over {samples.size} requests vs "
            f"{base.error_rate:.1%} before (allowed +{policy.max_error_rate:.1%})"
        )
    ok = samples[samples >= 0]
    if base.p95_s is not None and ok.size >= policy.min_requests:
        p95 = float(np.percentile(ok, 95))
        if p95 > max(policy.max_p95_ratio * base.p95_s, base.p95_s + LATENCY_NOISE_S):
            return (
                f"p95 latency {p95 * 1000:.3g} ms vs {base.p95_s * 1000:.3g} ms "
                f"before (allowed x{policy.max_p95_ratio:g})"
            )
    return None


@dataclass(frozen=True)
class Verdict:
    """What to do with a watched deployment: keep watching, roll back, or settle."""

    rollback: str | None = None  # "slot: reason" when a slot regressed
    settled: bool = False


def judge(
    policy: WatchPolicy,
    elapsed_s: float,
    samples: Mapping[str, np.ndarray],
    bases: Mapping[str, Baseline],
) -> Verdict:
    """The verdict on a deployment watched for ``elapsed_s`` seconds.

    ``samples`` are each slot's samples since the swap, ``bases`` each slot's baseline
    (a slot new in this deployment has none: a zero error rate and no latency bound).
    """
    for slot in sorted(samples):
        reason = regression(policy, samples[slot], bases.get(slot, Baseline()))
        if reason is not None:
            return Verdict(rollback=f"slot {slot}: {reason}")
    return Verdict(settled=elapsed_s >= policy.window_s)
