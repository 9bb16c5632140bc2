"""Interleaved timing of several callables (the demo's throughput step)."""

from __future__ import annotations

import pytest

from sp_ray.evaluation.timing import Timing, time_interleaved


def test_calls_are_interleaved_after_warmup():
    order: list[str] = []
    rounds: list[int] = []
    timings = time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                               repeats=3, warmup=2, on_repeat=rounds.append)
    assert order == ["a", "b"] * 5
    assert rounds == [1, 2, 3, 4, 5]
    assert list(timings) == ["a", "b"]
    assert all(len(t.latencies) == 3 for t in timings.values())  # warm-up rounds are not timed
    assert all(latency >= 0 for t in timings.values() for latency in t.latencies)


def test_timing_statistics():
    timing = Timing(latencies=(0.1, 0.2, 0.3, 0.4, 1.0), items_per_call=2)
    assert timing.median_s == pytest.approx(0.3)
    assert timing.p95_s == pytest.approx(0.88)  # numpy's linear interpolation between 0.4 and 1.0
    assert timing.items_per_second == pytest.approx(2 / 0.3)
    assert timing.items_per_second_p95 == pytest.approx(2 / 0.88)
    summary = timing.summary()
    assert summary["median_ms"] == pytest.approx(300.0) and summary["repeats"] == 5


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"repeats": 1, "warmup": -1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved({"a": lambda: None}, **kwargs)


def test_no_callables():
    with pytest.raises(ValueError, match="at least one"):
        time_interleaved({}, repeats=1)
