"""Staged-rollout policy as pure functions: wave sizes and the pass/abort decision.

No I/O, no clock: :mod:`slimfleet.host.fleet.rollout` feeds these with what devices
reported and acts on the answer.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, replace

from slimfleet.host.units import MAX_DURATION_S, show_duration

DEFAULT_WAVES = "1,10,50,100%"
#: p95s below this are compared as this: under a millisecond, scheduler and timer noise
#: on a busy device moves a p95 by more than any sensible limit (0.05 -> 0.08 ms is +60 %)
P95_FLOOR_MS = 1.0
#: more devices than any fleet this tool runs: a larger min_devices is a typing mistake
MAX_DEVICES = 1_000_000


@dataclass(frozen=True)
class RolloutSettings:
    """How a rollout proceeds; fleet.yaml ``rollouts:`` sets defaults, flags override.

    - ``waves``: cumulative wave sizes, each ``N`` (devices) or ``N%`` (of the group);
    - ``min_devices``: devices that must have reported before failures can abort;
    - ``max_failure_rate``: abort when failed / reported exceeds it (0 = any failure);
    - ``max_p95_regression``: abort when the median p95 of the wave's devices on the
      new version exceeds that on their previous version by more than this fraction
      (0.2 = 20 % slower); p95s under P95_FLOOR_MS count as P95_FLOOR_MS; None
      disables the check;
    - ``soak_s``: how long a wave's devices must stay healthy before the next wave;
    - ``timeout_s``: how long each device has to report its outcome.
    """

    waves: str = DEFAULT_WAVES
    min_devices: int = 1
    max_failure_rate: float = 0.0
    max_p95_regression: float | None = 0.5
    soak_s: float = 60.0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        """What any rollout, a stored one too, must hold (see :meth:`checked` for what
        a user may start one with)."""
        parse_waves(self.waves)
        if isinstance(self.min_devices, bool) or self.min_devices < 1:
            raise ValueError(f"min_devices must be an integer >= 1, got {self.min_devices!r}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ValueError(f"max_failure_rate must be in [0, 1], got {self.max_failure_rate}")
        regression = self.max_p95_regression
        if regression is not None and not (math.isfinite(regression) and regression >= 0):
            raise ValueError(f"max_p95_regression must be >= 0, got {regression}")
        if not (math.isfinite(self.soak_s) and self.soak_s >= 0):
            raise ValueError(f"soak must be >= 0 seconds, got {self.soak_s}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout_s}")

    def checked(self) -> RolloutSettings:
        """``self`` when a user may start a rollout with it, else a ValueError: waves
        that grow, soak and timeout of at most ten years, at most :data:`MAX_DEVICES`
        devices. Checked where settings are typed (fleet.yaml, flags), not where a
        stored rollout is read back, so records written before these bounds still load."""
        sizes = parse_waves(self.waves)
        for kind in (False, True):
            counts = [s.count for s in sizes if s.percent == kind]
            for before, after in itertools.pairwise(counts):
                if after <= before:
                    raise ValueError(
                        f"waves: {after:g}{'%' * kind} after {before:g}{'%' * kind}: waves are "
                        "cumulative sizes, each larger than the one before (e.g. 1,10,50,100%)"
                    )
        if self.min_devices > MAX_DEVICES:
            raise ValueError(f"min_devices must be at most {MAX_DEVICES}, got {self.min_devices}")
        for what, seconds in (("soak", self.soak_s), ("timeout", self.timeout_s)):
            if seconds > MAX_DURATION_S:
                raise ValueError(
                    f"{what} must be at most {show_duration(MAX_DURATION_S)}, got {seconds:g} s"
                )
        return self

    def override(self, **changes: object) -> RolloutSettings:
        """A copy with every change that is not None applied (CLI flags over defaults)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class WaveSize:
    """One cumulative wave size: ``count`` devices, or ``count`` percent of the group."""

    count: float
    percent: bool

    def devices(self, group_size: int) -> int:
        if not self.percent:
            return min(int(self.count), group_size)
        return min(group_size, max(1, math.ceil(group_size * self.count / 100)))


def parse_waves(text: str) -> tuple[WaveSize, ...]:
    """Parse ``1,10,50,100%``: items are device counts, or percentages with ``%``."""
    sizes: list[WaveSize] = []
    for item in str(text).split(","):
        item = item.strip()
        number = item.removesuffix("%")
        try:
            value = float(number) if item.endswith("%") else int(number)
        except ValueError:
            raise ValueError(
                f"waves: {item!r} is not a device count or a percentage (e.g. 1,10,50,100%)"
            ) from None
        if not (math.isfinite(value) and value > 0) or (item.endswith("%") and value > 100):
            raise ValueError(f"waves: {item!r} must be a count >= 1 or a percentage in (0, 100]")
        sizes.append(WaveSize(value, item.endswith("%")))
    return tuple(sizes)


def wave_plan(waves: str, group_size: int) -> list[int]:
    """Cumulative device counts per wave for a group, strictly increasing, ending at
    the last wave's size (waves that add no device are dropped)."""
    plan: list[int] = []
    for size in parse_waves(waves):
        count = size.devices(group_size)
        if count > (plan[-1] if plan else 0):
            plan.append(count)
    return plan


@dataclass(frozen=True)
class DeviceResult:
    """What one device of a rollout showed: did it serve and stay healthy, and its p95
    latency (ms) on the previous and on the new version, when known."""

    device: str
    healthy: bool
    p95_before: float | None = None
    p95_after: float | None = None


@dataclass(frozen=True)
class Decision:
    """``proceed`` is False when the rollout must abort; ``reason`` says why."""

    proceed: bool
    reason: str
    failure_rate: float
    p95_regression: float | None


def p95_regression(results: list[DeviceResult]) -> float | None:
    """Median p95 after over median p95 before, minus 1, on devices with both values;
    each median is raised to P95_FLOOR_MS first (sub-millisecond differences are noise)."""
    pairs = [
        (r.p95_before, r.p95_after)
        for r in results
        if r.p95_before is not None and r.p95_after is not None and r.p95_before > 0
    ]
    if not pairs:
        return None
    before = max(statistics.median(p for p, _ in pairs), P95_FLOOR_MS)
    after = max(statistics.median(a for _, a in pairs), P95_FLOOR_MS)
    return after / before - 1.0


def decide(results: list[DeviceResult], settings: RolloutSettings) -> Decision:
    """Whether the rollout may go on, given every device it has touched so far."""
    failed = [r.device for r in results if not r.healthy]
    rate = len(failed) / len(results) if results else 0.0
    regression = p95_regression([r for r in results if r.healthy])
    if len(results) >= settings.min_devices and rate > settings.max_failure_rate:
        shown = ", ".join(failed[:5]) + (" ..." if len(failed) > 5 else "")
        return Decision(
            False,
            f"{len(failed)} of {len(results)} devices failed ({rate:.0%} > "
            f"{settings.max_failure_rate:.0%}): {shown}",
            rate,
            regression,
        )
    limit = settings.max_p95_regression
    if limit is not None and regression is not None and regression > limit:
        return Decision(
            False, f"p95 latency regressed {regression:+.0%} (limit +{limit:.0%})", rate, regression
        )
    return Decision(True, "healthy", rate, regression)
