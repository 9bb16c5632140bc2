"""Wall-clock timing of several callables side by side: warm-up, then interleaved repeats.

Interleaving (A, B, A, B, ...) rather than timing A then B means both see the same background load
on a shared machine, so their ratio is fairer than either absolute figure. Rates come from the
median latency, which one slow outlier does not move; the p95 latency shows the spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    """The latencies of one callable.

    Attributes:
        latencies: seconds of each timed call, in call order.
        items_per_call: how many items (e.g. images) one call processes.
    """

    latencies: tuple[float, ...]
    items_per_call: int = 1

    @property
    def median_s(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p95_s(self) -> float:
        return float(np.percentile(self.latencies, 95))

    @property
    def items_per_second(self) -> float:
        """items_per_call / median latency."""
        return self.items_per_call / max(self.median_s, 1e-12)

    @property
    def items_per_second_p95(self) -> float:
        """items_per_call / p95 latency: the rate that 95% of the calls reach or beat."""
        return self.items_per_call / max(self.p95_s, 1e-12)

    def summary(self) -> dict[str, float]:
        return {"items_per_second": self.items_per_second, "items_per_second_p95": self.items_per_second_p95,
                "median_ms": self.median_s * 1e3, "p95_ms": self.p95_s * 1e3, "repeats": len(self.latencies),
                "items_per_call": self.items_per_call}


def time_interleaved(
    calls: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    items_per_call: int = 1,
    on_repeat: Callable[[int], None] | None = None,
) -> dict[str, Timing]:
    """Time every callable ``repeats`` times, one round of all of them per repeat, after ``warmup`` rounds.

    Args:
        calls: name -> a callable with no arguments (its result is discarded).
        repeats: timed rounds, >= 1.
        warmup: untimed rounds first (session initialisation, caches, allocator), >= 0.
        items_per_call: items one call processes, for the rates.
        on_repeat: called with the round number (1-based, warm-up rounds included) after each round,
            e.g. to advance a progress bar.

    Returns:
        name -> its `Timing`, in the order of ``calls``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if not calls:
        raise ValueError("time_interleaved needs at least one callable")
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(warmup + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_index >= warmup:
                latencies[name].append(time.perf_counter() - start)
        if on_repeat is not None:
            on_repeat(round_index + 1)
    return {name: Timing(tuple(values), items_per_call) for name, values in latencies.items()}
