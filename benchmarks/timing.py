"""Timing: warm-up excluded, N repetitions, robust summary statistics.

Wall time is :func:`time.perf_counter`. Each repetition also records the process's CPU time
(all threads), so ``cpu_util = cpu seconds / wall seconds`` shows how many cores the work
actually had: on a 2-core machine a 2-thread kernel that reads ~2.0 ran undisturbed, one that
reads well below 2 shared the cores with something else (see ``loadavg``). CPU seconds are
also the steadier measure of work on a shared machine: time spent waiting for a core does not
count in them (time spent spinning in a thread pool does).
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from typing import Callable, Iterable, Sequence


def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation (numpy's default method)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def percentiles(samples: Sequence[float], points: Iterable[float] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., "p95": ..., "p99": ...}`` of ``samples`` (for latency distributions)."""
    return {f"p{point:g}": quantile(samples, point / 100) for point in points}


@dataclasses.dataclass
class Stats:
    """Summary of repeated measurements, in the samples' unit (seconds for timings)."""

    n: int
    median: float
    min: float
    max: float
    q1: float
    q3: float
    iqr: float
    mean: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        samples = [float(value) for value in samples]
        q1, q3 = quantile(samples, 0.25), quantile(samples, 0.75)
        return cls(n=len(samples), median=statistics.median(samples), min=min(samples),
                   max=max(samples), q1=q1, q3=q3, iqr=q3 - q1,
                   mean=statistics.fmean(samples), samples=samples)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative range of the repetitions."""
        return (self.max - self.min) / self.median if self.median else float("nan")


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


@dataclasses.dataclass
class Measurement:
    """What :func:`measure` saw: the repetitions' wall times and the context around them."""

    wall: Stats
    cpu: Stats
    cpu_util: float
    warmup_s: list[float]
    loadavg_before: list[float] | None
    loadavg_after: list[float] | None
    stopped_early: bool

    def to_dict(self) -> dict:
        return {"wall_s": self.wall.to_dict(), "cpu_s": self.cpu.to_dict(),
                "cpu_util": self.cpu_util,
                "warmup_s": self.warmup_s, "loadavg_before": self.loadavg_before,
                "loadavg_after": self.loadavg_after, "stopped_early": self.stopped_early}


def measure(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
            budget_s: float | None = None, min_repeats: int = 1) -> Measurement:
    """Call ``fn`` ``warmup`` times untimed-in-the-summary, then ``repeats`` times timed.

    ``budget_s`` caps the timed phase: once it has been spent (and at least ``min_repeats``
    repetitions are done) no further repetition starts, and ``stopped_early`` says so.
    The warm-up times are kept apart (``warmup_s``): the first call carries one-off costs
    (allocations, kernel selection, compilation) that are reported, never averaged in.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    warmup_s = []
    before = loadavg()
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        warmup_s.append(time.perf_counter() - start)
    walls, cpus = [], []
    phase_start = time.perf_counter()
    stopped_early = False
    for index in range(repeats):
        if (budget_s is not None and index >= min_repeats
                and time.perf_counter() - phase_start >= budget_s):
            stopped_early = True
            break
        cpu_start, start = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return Measurement(wall=Stats.of(walls), cpu=Stats.of(cpus), cpu_util=sum(cpus) / sum(walls) if sum(walls) else 0.0,
                       warmup_s=warmup_s, loadavg_before=before, loadavg_after=loadavg(),
                       stopped_early=stopped_early)
