from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.transforms.v2 import functional as TF

from export.resample import masks_to_boxes, paste_masks, resize_image, resize_mask_logits
from sp_ray.data.transforms import mask_boxes as torch_masks_to_boxes
from sp_ray.models.postprocess import resize_mask_logits as torch_resize_mask_logits


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


@pytest.mark.parametrize(
    "image_size,orig_size",
    [((64, 96), (64, 96)), ((61, 90), (123, 181)), ((40, 17), (400, 170)), ((8, 8), (3, 5))],
)
def test_mask_logit_resampling_equals_pytorch_postprocess(image_size, orig_size) -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 8, 12) * 4
    expected = torch_resize_mask_logits(logits, image_size=image_size, orig_size=orig_size, mask_stride=8)
    got = resize_mask_logits(logits.numpy(), image_size=image_size, orig_size=orig_size, mask_stride=8)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)


def test_mask_logit_resampling_rejects_a_region_outside_the_input() -> None:
    with pytest.raises(ValueError, match="inside the padded input"):
        resize_mask_logits(
            np.zeros((1, 4, 4), np.float32), image_size=(40, 8), orig_size=(40, 8), mask_stride=8
        )


def test_mask_pasting_equals_torchvision() -> None:
    torch.manual_seed(0)
    probs = torch.rand(6, 28, 28)
    boxes = torch.tensor([
        [10.3, 5.7, 60.2, 40.9], [0.0, 0.0, 99.9, 79.9], [-5.0, 70.0, 20.0, 95.0], [50.5, 50.5, 51.0, 51.0],
        [30.0, 10.0, 31.5, 70.0], [90.0, 2.0, 140.0, 30.0],
    ])  # fmt: skip
    expected = paste_masks_in_image(probs[:, None], boxes, (80, 100), padding=1)[:, 0]
    got = paste_masks(probs.numpy(), boxes.numpy(), out_size=(80, 100), padding=1)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    assert paste_masks(np.zeros((0, 28, 28)), np.zeros((0, 4)), out_size=(5, 6)).shape == (0, 5, 6)


def test_boxes_from_masks_equal_pytorch() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 20, 30), bool)
    masks[0, 3:9, 4:20] = True
    masks[1] = rng.random((20, 30)) > 0.995
    masks[2, 19, 29] = True
    got = masks_to_boxes(masks)
    np.testing.assert_array_equal(got, torch_masks_to_boxes(torch.from_numpy(masks)).numpy())
    np.testing.assert_array_equal(got[0], [4, 3, 20, 9])
    np.testing.assert_array_equal(got[3], [0, 0, 0, 0])
