"""Paired differences and the exact bootstrap interval, against values computed by hand."""

import pytest

from sp_ray.evaluation.paired_stats import bootstrap_interval, paired_difference


def test_two_values_interval_is_their_range():
    # resampled means 1, 2, 3 with probabilities 1/4, 1/2, 1/4: 2.5% and 97.5% quantiles are 1 and 3
    assert bootstrap_interval([1.0, 3.0]) == (1.0, 3.0)


def test_one_outlier_of_three():
    # mean = k with k ~ Binomial(3, 1/3): P(k <= 2) = 26/27 < 0.975, so the upper bound is 3
    assert bootstrap_interval([0.0, 0.0, 3.0]) == (0.0, 3.0)


def test_one_outlier_of_nine_upper_bound_below_max():
    # mean = 4k / 9, k ~ Binomial(9, 1/9): P(k <= 2) = 0.931, P(k <= 3) = 0.988 -> upper bound 12 / 9
    low, high = bootstrap_interval([0.0] * 8 + [4.0])
    assert low == 0.0
    assert high == pytest.approx(12 / 9)


def test_constant_values_give_a_point_interval():
    assert bootstrap_interval([2.5] * 6) == (2.5, 2.5)


def test_monte_carlo_path_for_many_values_is_seeded_and_brackets_the_mean():
    values = [float(v) for v in range(12)]
    first, again = bootstrap_interval(values, seed=3), bootstrap_interval(values, seed=3)
    assert first == again
    assert first[0] < 5.5 < first[1]
    assert 0 < first[0] and first[1] < 11


def test_paired_difference_fields_and_verdicts():
    above = paired_difference([3.0, 4.0, 5.0], [1.0, 1.0, 1.0])
    assert above.differences == (2.0, 3.0, 4.0)
    assert above.mean == 3.0 and above.std == 1.0
    assert (above.ci_low, above.ci_high) == (2.0, 4.0)
    assert above.pairs_won == 3 and above.verdict == "above 0"
    assert paired_difference([0.0, 2.0], [1.0, 1.0]).verdict == "includes 0"
    below = paired_difference([1.0, 1.0], [2.0, 3.0])
    assert below.verdict == "below 0" and below.pairs_won == 0
    assert below.as_dict()["n"] == 2


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1.0], confidence=1.5)
