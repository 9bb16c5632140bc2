from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sp_ray.data.transforms import mask_boxes
from sp_ray.models.postprocess import postprocess, resize_mask_logits, select_topk
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


def test_resize_mask_logits_without_padding_equals_interpolate() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6)
    out = resize_mask_logits(logits, image_size=(32, 48), orig_size=(20, 30))
    expected = F.interpolate(logits[None], size=(20, 30), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_resize_mask_logits_crops_the_padded_region() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 8)
    # Valid input region 32 x 40 of a 64 x 64 padded input = the first 4 x 5 cells of the stride-8 map.
    out = resize_mask_logits(logits, image_size=(32, 40), orig_size=(48, 60))
    expected = F.interpolate(logits[None, :, :4, :5], size=(48, 60), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inside the padded input"):
        resize_mask_logits(logits, image_size=(72, 40), orig_size=(48, 60))


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
