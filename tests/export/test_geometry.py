from __future__ import annotations

import pytest

from export.geometry import fit_within, padded_size, resize_for_inference


def test_resize_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        resize_for_inference(0, 10, max_size=100, short_size=50)
    with pytest.raises(ValueError, match="max_size"):
        resize_for_inference(10, 10, max_size=0, short_size=50)
    with pytest.raises(ValueError, match="elongated"):
        resize_for_inference(1, 5000, max_size=100, short_size=50)


def test_fit_within_keeps_fitting_sizes_and_shrinks_others_keeping_the_ratio() -> None:
    assert fit_within(100, 200, max_h=128, max_w=256) == (100, 200)
    assert fit_within(800, 1333, max_h=512, max_w=512) == (307, 512)
    h, w = fit_within(1333, 800, max_h=512, max_w=512)
    assert (h, w) == (512, 307)


def test_padded_size_rounds_the_largest_sides_up() -> None:
    assert padded_size([(100, 60), (64, 130)], size_divisor=32) == (128, 160)
    assert padded_size([(64, 64)], size_divisor=32) == (64, 64)
    with pytest.raises(ValueError):
        padded_size([], size_divisor=32)
