"""Paired comparisons of two initialisations over the same runs, with a bootstrap interval of the mean gap.

Low-data results move by several AP between seeds and between machines, so a comparison of two
initialisations is made on paired runs (same labeled split, training seed and arithmetic, only the
initialisation differs): the per-pair differences cancel what the pair shares, and the percentile
bootstrap of their mean gives the interval. For the few pairs a benchmark runs (up to `EXACT_MAX_PAIRS`)
the bootstrap distribution is enumerated exactly, so the interval is a fixed function of the numbers (no
resampling noise, and checkable by hand); larger samples use a seeded Monte Carlo bootstrap.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

EXACT_MAX_PAIRS = 9  # C(2n-1, n) resamples: 24310 at n = 9, 92378 at n = 10
MONTE_CARLO_RESAMPLES = 20000


@dataclass(frozen=True)
class PairedDifference:
    """``high - low`` over paired runs: the per-pair gaps, their mean and std, and a bootstrap interval.

    ``ci_low`` / ``ci_high`` bound the mean gap at ``confidence``; ``verdict`` is "above 0" when the whole
    interval is above 0, "below 0" when it is below, else "includes 0".
    """

    differences: tuple[float, ...]
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float
    pairs_won: int  # pairs in which high > low

    @property
    def verdict(self) -> str:
        if self.ci_low > 0:
            return "above 0"
        if self.ci_high < 0:
            return "below 0"
        return "includes 0"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "differences": list(self.differences), "n": len(self.differences),
                "verdict": self.verdict}


def bootstrap_interval(values: Sequence[float], *, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    The bootstrap distribution is that of the mean of ``n`` draws with replacement from the ``n`` values.
    For ``n <= EXACT_MAX_PAIRS`` it is enumerated exactly: each multiset of indices has multinomial
    probability ``n! / (prod counts!) / n^n``. The bounds are the lower quantiles of that distribution at
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``: the smallest resampled mean whose cumulative
    probability reaches the level. Larger ``n`` draw `MONTE_CARLO_RESAMPLES` resamples with ``seed``.

    Args:
        values: [n] observations (n >= 1), e.g. per-pair AP differences.
        confidence: in (0, 1).
        seed: seed of the Monte Carlo resampling (unused when exact).

    Returns:
        (low, high).
    """
    if not values:
        raise ValueError("bootstrap_interval needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    data = np.asarray(values, dtype=np.float64)
    n = len(data)
    if n <= EXACT_MAX_PAIRS:
        means, weights = [], []
        for picks in itertools.combinations_with_replacement(range(n), n):
            counts = Counter(picks).values()
            weights.append(math.factorial(n) / math.prod(math.factorial(c) for c in counts) / n**n)
            means.append(float(data[list(picks)].mean()))
        order = np.argsort(means, kind="stable")
        sorted_means = np.asarray(means)[order]
        cumulative = np.cumsum(np.asarray(weights)[order])
    else:
        rng = np.random.default_rng(seed)
        sorted_means = np.sort(data[rng.integers(0, n, size=(MONTE_CARLO_RESAMPLES, n))].mean(axis=1))
        cumulative = np.arange(1, MONTE_CARLO_RESAMPLES + 1) / MONTE_CARLO_RESAMPLES

    def quantile(level: float) -> float:
        # 1e-12 absorbs the rounding of the summed probabilities at an exact level
        index = int(np.searchsorted(cumulative, level - 1e-12, side="left"))
        return float(sorted_means[min(index, len(sorted_means) - 1)])

    alpha = (1 - confidence) / 2
    return quantile(alpha), quantile(1 - alpha)


def paired_difference(
    high: Sequence[float], low: Sequence[float], *, confidence: float = 0.95, seed: int = 0
) -> PairedDifference:
    """``high[i] - low[i]`` for every pair ``i`` (the same run but for the initialisation), summarised.

    Args:
        high, low: [n] values of the two initialisations, in the same run order.
        confidence: of the bootstrap interval of the mean difference.
        seed: of a Monte Carlo bootstrap (see `bootstrap_interval`).

    Returns:
        A `PairedDifference`; ``std`` is the sample std (0 for one pair).
    """
    if len(high) != len(low):
        raise ValueError(f"paired values need the same length, got {len(high)} and {len(low)}")
    differences = tuple(float(h) - float(lo) for h, lo in zip(high, low, strict=True))
    ci_low, ci_high = bootstrap_interval(differences, confidence=confidence, seed=seed)
    return PairedDifference(
        differences=differences, mean=statistics.fmean(differences),
        std=statistics.stdev(differences) if len(differences) > 1 else 0.0,
        ci_low=ci_low, ci_high=ci_high, confidence=confidence, pairs_won=sum(d > 0 for d in differences),
    )
