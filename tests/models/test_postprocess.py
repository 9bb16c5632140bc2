from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sp_ray.data.transforms import mask_boxes
from sp_ray.models.postprocess import paste_crops, paste_mask_logits, paste_roi_masks, postprocess, select_topk
from sp_ray.types import ModelOutputs


def test_select_topk_shapes_and_scores() -> None:
    torch.manual_seed(0)
    scores, labels, masks = select_topk(torch.randn(2, 5, 3), torch.randn(2, 5, 4, 6), k=7)
    assert scores.shape == labels.shape == (2, 7) and masks.shape == (2, 7, 4, 6)
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 3
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert torch.all((scores >= 0) & (scores <= 1))


def test_select_topk_picks_kernel_and_class_and_rescores_by_maskness() -> None:
    # Kernel 0 / class 1 has the highest class probability but an empty mask: maskness 0, so it goes last.
    # Kernel 2 / class 0 is confident with a full mask: maskness sigmoid(4).
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 0, 1] = 5.0
    logits[0, 2, 0] = 3.0
    logits[0, 1, 1] = 0.0
    masks = torch.full((1, 3, 2, 2), -4.0)
    masks[0, 2] = 4.0
    masks[0, 1, 0, 0] = 2.0
    scores, labels, picked = select_topk(logits, masks, k=3)
    assert labels[0].tolist() == [0, 1, 1]
    torch.testing.assert_close(picked[0, 0], masks[0, 2])
    torch.testing.assert_close(picked[0, 1], masks[0, 1])
    torch.testing.assert_close(picked[0, 2], masks[0, 0])
    expected = torch.tensor(
        [
            torch.sigmoid(torch.tensor(3.0)) * torch.sigmoid(torch.tensor(4.0)),
            0.5 * torch.sigmoid(torch.tensor(2.0)),
            0,
        ]
    )
    torch.testing.assert_close(scores[0], expected)


def test_select_topk_rejects_k_out_of_range() -> None:
    with pytest.raises(ValueError, match="N\\*C = 6"):
        select_topk(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2, 2), k=7)


def test_masks_to_boxes_exclusive_corners_and_empty() -> None:
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 9, 0] = True
    boxes = mask_boxes(masks)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[3, 2, 9, 5], [0, 9, 1, 10], [0, 0, 0, 0]]


def _dense(boxes: torch.Tensor, crops: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """The crops written into empty images, independently of ``paste_crops``."""
    out = torch.zeros((len(crops), *size), dtype=torch.bool)
    for k, (box, crop) in enumerate(zip(boxes.tolist(), crops, strict=True)):
        out[k, box[1] : box[3], box[0] : box[2]] = crop
    return out


def test_pasted_masks_without_padding_equal_thresholded_interpolate() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6) * 3
    boxes, crops = paste_mask_logits(logits, image_size=(32, 48), orig_size=(20, 30))
    expected = F.interpolate(logits[None], size=(20, 30), mode="bilinear", align_corners=False)[0].sigmoid() > 0.5
    assert torch.equal(_dense(boxes, crops, (20, 30)), expected)
    assert torch.equal(paste_crops(boxes, crops, (20, 30)), expected)
    assert torch.equal(boxes.float(), mask_boxes(expected))


def test_pasted_masks_crop_the_padded_region() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 8) * 3
    # Valid input region 32 x 40 of a 64 x 64 padded input = the first 4 x 5 cells of the stride-8 map.
    boxes, crops = paste_mask_logits(logits, image_size=(32, 40), orig_size=(48, 60))
    expected = F.interpolate(logits[None, :, :4, :5], size=(48, 60), mode="bilinear", align_corners=False)[0]
    assert torch.equal(_dense(boxes, crops, (48, 60)), expected.sigmoid() > 0.5)
    with pytest.raises(ValueError, match="inside the padded input"):
        paste_mask_logits(logits, image_size=(72, 40), orig_size=(48, 60))


@pytest.mark.parametrize(
    "image_size,orig_size", [((61, 90), (123, 181)), ((40, 17), (400, 170)), ((8, 8), (3, 5)), ((64, 96), (64, 96))]
)
def test_pasting_box_by_box_equals_full_image_resampling(image_size, orig_size) -> None:
    """Reference: every pixel of the image sampled at once (the pre-box post-processing), written here."""
    torch.manual_seed(1)
    logits = torch.randn(6, 8, 12) * 4 - 3  # mostly below the threshold: small masks in big images
    logits[0] = -20.0  # an empty mask
    h, w = logits.shape[-2:]

    def grid(out_size: int, valid: int, cells: int) -> torch.Tensor:
        cell = ((torch.arange(out_size) + 0.5) * (valid / out_size) / 8 - 0.5).clamp(0, -(-valid // 8) - 1)
        return (2 * cell + 1) / cells - 1

    full = torch.stack(torch.meshgrid(grid(orig_size[1], image_size[1], w), grid(orig_size[0], image_size[0], h),
                                      indexing="xy"), dim=-1)[None].expand(6, -1, -1, -1)
    expected = F.grid_sample(logits[:, None], full, mode="bilinear", align_corners=False)[:, 0].sigmoid() > 0.5
    boxes, crops = paste_mask_logits(logits, image_size=image_size, orig_size=orig_size)
    assert torch.equal(_dense(boxes, crops, orig_size), expected)
    assert boxes[0].tolist() == [0, 0, 0, 0] and crops[0].numel() == 0
    # Each crop is its mask's tight box: no empty border row or column.
    for crop in crops[1:]:
        if crop.numel():
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()


def test_roi_masks_pasted_per_box_equal_torchvision_thresholded() -> None:
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    torch.manual_seed(0)
    probs = torch.rand(5, 28, 28)
    boxes = torch.tensor([[10.3, 5.7, 60.2, 40.9], [0.0, 0.0, 99.9, 79.9], [-5.0, 70.0, 20.0, 95.0],
                          [50.5, 50.5, 51.0, 51.0], [90.0, 2.0, 140.0, 30.0]])
    expected = paste_masks_in_image(probs[:, None], boxes, (80, 100), padding=1)[:, 0] > 0.5
    tight, crops = paste_roi_masks(probs, boxes, orig_size=(80, 100), mask_threshold=0.5)
    assert torch.equal(_dense(tight, crops, (80, 100)), expected)
    assert torch.equal(tight.float(), mask_boxes(expected))
    none, no_crops = paste_roi_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), orig_size=(8, 9))
    assert none.shape == (0, 4) and no_crops == [] and paste_crops(none, no_crops, (8, 9)).shape == (0, 8, 9)


def _outputs(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> ModelOutputs:
    batch, n = pred_logits.shape[:2]
    return ModelOutputs(
        pred_logits=pred_logits, pred_masks=pred_masks, pred_kernels=torch.zeros(batch, n, 4),
        aux_outputs=[], init_masks=pred_masks, init_kernels=torch.zeros(batch, n, 4),
    )  # fmt: skip


def test_postprocess_masks_and_boxes_in_original_pixels() -> None:
    """Padded input 64 x 64 (map 8 x 8); valid region 32 x 48; original image 64 x 96 (scale 2).

    Kernel 0 (class 0) covers map cells rows 0-1, cols 0-2 = input rows 0-15, cols 0-23 = original rows 0-31,
    cols 0-47. Kernel 1 (class 1) covers only padded cells (rows 5-7): nothing survives the crop.
    """
    logits = torch.full((1, 2, 2), -10.0)
    logits[0, 0, 0] = 4.0
    logits[0, 1, 1] = 3.0
    masks = torch.full((1, 2, 8, 8), -10.0)
    masks[0, 0, :2, :3] = 10.0
    masks[0, 1, 5:, :] = 10.0
    [result] = postprocess(_outputs(logits, masks), image_sizes=[(32, 48)], orig_sizes=[(64, 96)], k=2)
    assert result["labels"].tolist() == [0, 1]
    assert result["masks"].shape == (2, 64, 96) and result["masks"].dtype == torch.bool
    # Inside the rectangle and outside it; bilinear blending rounds off the inner corner only.
    assert result["masks"][0, :24, :40].all() and result["masks"][0, :32, :48].float().mean() > 0.95
    assert not result["masks"][0, 32:].any() and not result["masks"][0, :, 48:].any()
    assert not result["masks"][1].any()
    assert result["boxes"].tolist() == [[0, 0, 48, 32], [0, 0, 0, 0]]
    assert result["scores"][0] > result["scores"][1] > 0


def test_postprocess_batch_thresholds_and_caps_k() -> None:
    torch.manual_seed(0)
    logits, masks = torch.randn(2, 4, 3), torch.randn(2, 4, 8, 12) * 4
    results = postprocess(
        _outputs(logits, masks), image_sizes=[(64, 96), (40, 90)], orig_sizes=[(32, 48), (80, 180)], k=100
    )
    assert [r["masks"].shape for r in results] == [(12, 32, 48), (12, 80, 180)]
    assert all(
        r["boxes"].shape == (12, 4) and r["scores"].shape == r["labels"].shape == (12,) for r in results
    )
    threshold = results[0]["scores"].median().item()
    [kept, _] = postprocess(
        _outputs(logits, masks), image_sizes=[(64, 96), (40, 90)], orig_sizes=[(32, 48), (80, 180)],
        score_threshold=threshold,
    )  # fmt: skip
    assert len(kept["scores"]) == int((results[0]["scores"] > threshold).sum()) and torch.all(
        kept["scores"] > threshold
    )
    with pytest.raises(ValueError, match="batch of 2"):
        postprocess(_outputs(logits, masks), image_sizes=[(64, 96)], orig_sizes=[(32, 48)])
