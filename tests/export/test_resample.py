from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.transforms.v2 import functional as TF

from export.resample import gather_masks, paste_mask_logits, paste_roi_masks, resize_image
from export.rle import encode_rle
from sp_ray.data.transforms import mask_boxes as torch_masks_to_boxes


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.integers(-9, 10, (h, w, 3)), axis=1) % 256
    return np.where(rng.random((h, w, 1)) < 0.2, rng.integers(0, 256, (h, w, 3)), smooth).astype(np.uint8)


@pytest.mark.parametrize(
    "size,out",
    [((480, 640), (120, 160)), ((100, 133), (160, 212)), ((333, 517), (160, 248)), ((97, 61), (160, 100)),
     ((64, 64), (64, 64)), ((200, 50), (64, 16)), ((7, 900), (1, 160))],
)  # fmt: skip
def test_image_resize_equals_torchvision_antialiased_bilinear(size, out) -> None:
    image = _image(*size)
    expected = TF.resize(torch.from_numpy(image).permute(2, 0, 1), list(out), antialias=True)
    got = resize_image(image, out)
    assert got.dtype == np.uint8 and got.shape == (*out, 3)
    np.testing.assert_array_equal(got, expected.permute(1, 2, 0).numpy())


def test_image_resize_rejects_empty_output() -> None:
    with pytest.raises(ValueError, match="positive"):
        resize_image(_image(10, 10), (0, 5))


def _full_image_reference(logits: np.ndarray, image_size, orig_size, stride: int = 8) -> np.ndarray:
    """Every pixel of the image sampled at once, as the post-processing did before pasting per box:
    ``grid_sample`` over the whole H0 x W0 grid (float32 [K, H0, W0] logits)."""
    k, h, w = logits.shape

    def grid(out_size: int, valid: int, cells: int) -> torch.Tensor:
        cell = ((torch.arange(out_size) + 0.5) * (valid / out_size) / stride - 0.5).clamp(0, -(-valid // stride) - 1)
        return (2 * cell + 1) / cells - 1

    full = torch.stack(torch.meshgrid(grid(orig_size[1], image_size[1], w), grid(orig_size[0], image_size[0], h),
                                      indexing="xy"), dim=-1)[None].expand(k, -1, -1, -1)
    return F.grid_sample(torch.from_numpy(logits)[:, None], full, mode="bilinear", align_corners=False)[:, 0].numpy()


@pytest.mark.parametrize(
    "image_size,orig_size",
    [((64, 96), (64, 96)), ((61, 90), (123, 181)), ((40, 17), (400, 170)), ((8, 8), (3, 5)), ((50, 90), (997, 1601))],
)
@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_pasting_per_box_equals_full_image_resampling_up_to_boundary_pixels(image_size, orig_size, threshold) -> None:
    """Masks of every size (empty, small, whole image) against the full-image reference; a pixel may differ
    only where the reference logit is within float rounding of the threshold."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((7, 8, 12)) * 4).astype(np.float32)
    logits[0] = -30.0  # empty
    logits[1] = 30.0  # the whole valid region
    logits[2] = -30.0
    logits[2, 3, 5] = 10.0  # one cell
    reference = _full_image_reference(logits, image_size, orig_size)

    def paste():
        return paste_mask_logits(logits, image_size=image_size, orig_size=orig_size, mask_stride=8,
                                 threshold=threshold)

    boxes, dense, none = gather_masks(paste(), count=7, size=orig_size, rle=False)
    assert dense.shape == (7, *orig_size) and dense.dtype == bool and none is None
    differ = dense != (reference > threshold)
    assert np.all(np.abs(reference[differ] - threshold) < 1e-3), np.abs(reference[differ] - threshold).max()
    assert differ.sum() <= 1e-4 * differ.size
    assert not dense[0].any() and dense[1].all()
    np.testing.assert_array_equal(boxes, torch_masks_to_boxes(torch.from_numpy(dense)).numpy())
    for ((x0, y0, x1, y1), crop), mask in zip(paste(), dense, strict=True):
        assert crop.shape == (y1 - y0, x1 - x0)  # computed inside the box only
        assert mask.sum() == crop.sum()
    rle_boxes, no_masks, rles = gather_masks(paste(), count=7, size=orig_size, rle=True)
    assert no_masks is None and [encode_rle(mask) for mask in dense] == rles
    np.testing.assert_array_equal(rle_boxes, boxes)


def test_pasting_rejects_a_region_outside_the_input() -> None:
    with pytest.raises(ValueError, match="inside the padded input"):  # at the call, not when iterated
        paste_mask_logits(
            np.zeros((1, 4, 4), np.float32), image_size=(40, 8), orig_size=(40, 8), mask_stride=8, threshold=0.0
        )


def test_roi_mask_pasting_equals_thresholded_torchvision() -> None:
    torch.manual_seed(0)
    probs = torch.rand(6, 28, 28)
    boxes = torch.tensor([
        [10.3, 5.7, 60.2, 40.9], [0.0, 0.0, 99.9, 79.9], [-5.0, 70.0, 20.0, 95.0], [50.5, 50.5, 51.0, 51.0],
        [30.0, 10.0, 31.5, 70.0], [90.0, 2.0, 140.0, 30.0],
    ])  # fmt: skip
    expected = paste_masks_in_image(probs[:, None], boxes, (80, 100), padding=1)[:, 0].numpy() > 0.5
    pasted = paste_roi_masks(probs.numpy(), boxes.numpy(), out_size=(80, 100), threshold=0.5, padding=1)
    tight, dense, _ = gather_masks(pasted, count=6, size=(80, 100), rle=False)
    np.testing.assert_array_equal(dense, expected)
    np.testing.assert_array_equal(tight, torch_masks_to_boxes(torch.from_numpy(expected)).numpy())
    outside = paste_roi_masks(np.ones((1, 28, 28)), np.array([[120.0, 90.0, 130.0, 99.0]]), out_size=(80, 100),
                              threshold=0.5)  # torchvision fails on a box outside the image; this is empty
    assert [box for box, _ in outside] == [[0, 0, 0, 0]]
    empty = paste_roi_masks(np.zeros((0, 28, 28)), np.zeros((0, 4)), out_size=(5, 6), threshold=0.5)
    boxes_, masks, _ = gather_masks(empty, count=0, size=(5, 6), rle=False)
    assert masks.shape == (0, 5, 6) and boxes_.shape == (0, 4)
