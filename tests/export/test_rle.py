from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest

from export.rle import decode_rle, encode_rle, encode_rle_box


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    blob = np.zeros((37, 53), bool)
    blob[5:30, 10:40] = True
    full = np.ones((4, 7), bool)
    corner = np.zeros((9, 9), bool)
    corner[0, 0] = True
    noise = rng.random((61, 47)) > 0.5
    sparse = rng.random((3, 500)) > 0.97
    return [np.zeros((13, 17), bool), full, corner, blob, noise, sparse]


@pytest.mark.parametrize("index", range(6))
def test_encoding_equals_pycocotools(index: int) -> None:
    mask = _cases()[index]
    expected = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    got = encode_rle(mask)
    assert got["size"] == list(expected["size"])
    assert got["counts"] == expected["counts"].decode("ascii")
    np.testing.assert_array_equal(decode_rle(got), mask)
    np.testing.assert_array_equal(mask_util.decode({**got, "counts": got["counts"].encode()}) > 0, mask)


def test_decode_rejects_runs_that_do_not_cover_the_mask() -> None:
    rle = encode_rle(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="cover"):
        decode_rle({"size": [5, 4], "counts": rle["counts"]})


def test_encode_rejects_stacks() -> None:
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        encode_rle(np.zeros((2, 4, 4), bool))


def test_encoding_from_a_box_equals_pycocotools_on_the_full_mask() -> None:
    """Boxes anywhere, as tall or wide as the image, at its corners, empty or full inside."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 12, 2))
        y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        y1, x1 = int(rng.integers(y0 + 1, height + 1)), int(rng.integers(x0 + 1, width + 1))
        mask = np.zeros((height, width), bool)
        mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) > rng.choice([0.0, 0.5, 1.0])
        expected = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        got = encode_rle_box(mask[y0:y1, x0:x1], top=y0, left=x0, size=(height, width))
        assert got == {"size": [height, width], "counts": expected["counts"].decode("ascii")}


def test_encoding_from_a_box_rejects_a_box_outside_the_image() -> None:
    with pytest.raises(ValueError, match="outside 4x4"):
        encode_rle_box(np.ones((2, 2), bool), top=3, left=0, size=(4, 4))
