from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sp_ray.pretrain.saliency import (
    Proposals,
    mask_boxes_from_projections,
    matrix_nms,
    pyramid_queries,
    saliency_proposals,
)

STRIDE = 16
IMAGE = 256


def _shapes_image() -> np.ndarray:
    """int label map [256, 256]: 0 background, 1 disc, 2 square, 3 triangle, 4 ellipse (no overlaps)."""
    yy, xx = np.mgrid[0:IMAGE, 0:IMAGE] + 0.5
    labels = np.zeros((IMAGE, IMAGE), dtype=np.int64)
    labels[(xx - 60) ** 2 + (yy - 110) ** 2 <= 32**2] = 1
    labels[(np.abs(xx - 180) <= 36) & (np.abs(yy - 100) <= 36)] = 2
    labels[(yy >= 150) & (yy <= 230) & (np.abs(xx - 70) <= (yy - 150) * 0.6)] = 3
    labels[((xx - 180) / 50) ** 2 + ((yy - 200) / 28) ** 2 <= 1] = 4
    return labels


def _handmade_c5(labels: np.ndarray, channels: int = 64, seed: int = 0) -> torch.Tensor:
    """C5 [C, h, w]: each cell is the area-weighted mix of its labels' random unit vectors."""
    generator = torch.Generator().manual_seed(seed)
    vectors = F.normalize(torch.randn(int(labels.max()) + 1, channels, generator=generator), dim=1)
    onehot = F.one_hot(torch.from_numpy(labels), int(labels.max()) + 1).permute(2, 0, 1).float()
    coverage = F.avg_pool2d(onehot[None], STRIDE)[0]  # (labels, h, w) fraction of each cell
    return torch.einsum("khw,kc->chw", coverage, vectors)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def test_proposals_recover_the_shapes_of_handmade_features() -> None:
    labels = _shapes_image()
    proposals = saliency_proposals(_handmade_c5(labels), (IMAGE, IMAGE))
    assert isinstance(proposals, Proposals)
    count = proposals.masks.shape[0]
    assert proposals.masks.shape == (count, IMAGE, IMAGE) and proposals.masks.dtype == torch.bool
    assert proposals.scores.shape == (count,) and proposals.boxes.shape == (count, 4)
    assert proposals.queries.shape == (count, 64)
    assert torch.allclose(proposals.queries.norm(dim=1), torch.ones(count), atol=1e-5)
    assert bool((proposals.scores[:-1] >= proposals.scores[1:]).all())
    assert bool((proposals.scores >= 0.7).all())

    truth = torch.from_numpy(labels)
    best = [max(_iou(mask, truth == k) for mask in proposals.masks) for k in range(1, 5)]
    assert sum(iou >= 0.5 for iou in best) >= 3, best
    # Duplicates of one shape are suppressed: no two proposals cover the same instance.
    assert count <= 6
    # No proposal is the background (it spans the image width).
    assert all(_iou(mask, truth == 0) < 0.5 for mask in proposals.masks)


def test_masks_are_binarised_after_upsampling_to_the_image() -> None:
    labels = _shapes_image()
    proposals = saliency_proposals(_handmade_c5(labels), (IMAGE, IMAGE))
    disc = torch.from_numpy(labels == 1)
    mask = max(proposals.masks, key=lambda m: _iou(m, disc))
    # A mask binarised at C5 size and repeated would be a union of 16x16 blocks; the upsampled soft map
    # cuts through cells, so some 16x16 cell is only partly covered.
    blocks = mask.float().reshape(IMAGE // STRIDE, STRIDE, IMAGE // STRIDE, STRIDE).mean((1, 3))
    assert bool(((blocks > 0) & (blocks < 1)).any())
    assert _iou(mask, disc) >= 0.8


def test_masks_come_at_a_non_square_image_size() -> None:
    labels = _shapes_image()
    proposals = saliency_proposals(_handmade_c5(labels), (200, 330))
    assert proposals.masks.shape[1:] == (200, 330)
    assert proposals.masks.shape[0] >= 3


def test_matrix_nms_hand_computed_three_masks() -> None:
    # 1-D masks of 8 cells. A = 0..3, B = 0..1, C = 2..5: IoU(A,B) = 2/4, IoU(A,C) = 2/6, IoU(B,C) = 0.
    masks = torch.zeros(3, 1, 8, dtype=torch.bool)
    masks[0, 0, 0:4] = True
    masks[1, 0, 0:2] = True
    masks[2, 0, 2:6] = True
    scores = torch.tensor([0.9, 0.8, 0.7])
    decayed = matrix_nms(masks, scores, sigma=2.0)
    # B: min(exp(-2 * 0.5^2), terms >= 1) ; C: min(exp(-2 * (1/3)^2), exp(2 * 0.5^2) from B, ...)
    expected = torch.tensor([0.9, 0.8 * math.exp(-0.5), 0.7 * math.exp(-2.0 / 9.0)])
    assert torch.allclose(decayed, expected, atol=1e-6)


def test_matrix_nms_compensates_for_a_suppressed_suppressor() -> None:
    # A = 0..3, B = 2..5, C = 4..7: B overlaps A (IoU 1/3) and C overlaps only B (IoU 1/3). B is itself
    # suppressed by as much as it would suppress C, so C keeps its score.
    masks = torch.zeros(3, 8, dtype=torch.bool)
    masks[0, 0:4] = True
    masks[1, 2:6] = True
    masks[2, 4:8] = True
    decayed = matrix_nms(masks, torch.tensor([0.9, 0.8, 0.7]), sigma=2.0)
    expected = torch.tensor([0.9, 0.8 * math.exp(-2.0 / 9.0), 0.7])
    assert torch.allclose(decayed, expected, atol=1e-6)


def test_matrix_nms_duplicate_and_edge_cases() -> None:
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    assert torch.allclose(
        matrix_nms(mask, torch.tensor([1.0, 1.0]), sigma=2.0), torch.tensor([1.0, math.exp(-2)])
    )
    assert matrix_nms(torch.zeros(0, 4, 4, dtype=torch.bool), torch.zeros(0)).shape == (0,)
    assert torch.equal(matrix_nms(mask[:1], torch.tensor([0.3])), torch.tensor([0.3]))
    with pytest.raises(ValueError, match="descending"):
        matrix_nms(mask, torch.tensor([0.1, 0.9]))
    with pytest.raises(ValueError, match="2 masks but 1 scores"):
        matrix_nms(mask, torch.tensor([0.1]))


def test_pyramid_queries_count_and_scale_one_is_identity() -> None:
    c5 = torch.randn(8, 25, 42)
    queries = pyramid_queries(c5, [1.0, 0.5, 0.25])
    assert queries.shape == (25 * 42 + 12 * 21 + 6 * 10, 8)
    assert torch.equal(queries[: 25 * 42], c5.reshape(8, -1).T)
    assert pyramid_queries(torch.randn(8, 2, 3), [0.25]).shape == (1, 8)  # a side never drops to 0


def test_boxes_from_projections() -> None:
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True  # rows 2..4, columns 3..8: tight box [3, 2, 9, 5]
    masks[1, 0, 0] = True
    masks[1, 0, 4] = True  # two columns 0 and 4: extent 2 centred at the centre of mass 2.5
    boxes = mask_boxes_from_projections(masks)
    assert torch.allclose(boxes, torch.tensor([[3.0, 2.0, 9.0, 5.0], [1.5, 0.0, 3.5, 1.0]]))


def _labels_with(extra: str) -> np.ndarray:
    labels = np.zeros((IMAGE, IMAGE), dtype=np.int64)
    # Shapes aligned to the 16-pixel C5 cells, so the recovered masks are exact.
    labels[128:208, 48:128] = 1  # a square in the middle, kept by every filter
    if extra == "top":
        labels[0:32, 144:224] = 2  # centre y = 16 px < 0.2 * 256
    elif extra == "wide":
        labels[208:240, 0:IMAGE] = 2  # spans the whole width
    elif extra == "tiny":
        labels[16:32, 192:208] = 2  # exactly one C5 cell
        labels[208:224, 192:208] = 3  # one cell low enough for the centre filter
    return labels


def _best_iou(proposals: Proposals, truth: np.ndarray) -> float:
    target = torch.from_numpy(truth)
    return max((_iou(mask, target) for mask in proposals.masks), default=0.0)


def test_center_filter_drops_masks_at_the_top() -> None:
    labels = _labels_with("top")
    c5 = _handmade_c5(labels)
    assert _best_iou(saliency_proposals(c5, (IMAGE, IMAGE), min_center_y=0.0), labels == 2) > 0.8
    kept = saliency_proposals(c5, (IMAGE, IMAGE), min_center_y=0.2)
    assert _best_iou(kept, labels == 2) < 0.5
    assert _best_iou(kept, labels == 1) > 0.8
    assert bool(((kept.boxes[:, 1] + kept.boxes[:, 3]) / 2 > 0.2 * IMAGE).all())


def test_width_filter_drops_masks_spanning_the_image() -> None:
    labels = _labels_with("wide")
    c5 = _handmade_c5(labels)
    assert _best_iou(saliency_proposals(c5, (IMAGE, IMAGE), max_box_width=1.01), labels == 2) > 0.8
    kept = saliency_proposals(c5, (IMAGE, IMAGE), max_box_width=0.95)
    assert _best_iou(kept, labels == 2) < 0.5
    assert _best_iou(kept, labels == 1) > 0.8
    assert bool((kept.boxes[:, 2] - kept.boxes[:, 0] < 0.95 * IMAGE).all())


def test_maskness_filter_and_top_k() -> None:
    labels = _shapes_image()
    c5 = _handmade_c5(labels)
    everything = saliency_proposals(c5, (IMAGE, IMAGE), min_maskness=0.0, top_k=1000)
    kept = saliency_proposals(c5, (IMAGE, IMAGE), min_maskness=0.7, top_k=1000)
    assert everything.masks.shape[0] > kept.masks.shape[0] > 0
    assert bool((kept.scores >= 0.7).all())
    assert bool((everything.scores < 0.7).any())
    assert saliency_proposals(c5, (IMAGE, IMAGE), min_maskness=0.0, top_k=2).masks.shape[0] <= 2


def test_min_area_drops_single_cell_masks() -> None:
    labels = _labels_with("tiny")
    c5 = _handmade_c5(labels)
    assert _best_iou(saliency_proposals(c5, (IMAGE, IMAGE), min_area=1), labels == 3) > 0.5
    assert _best_iou(saliency_proposals(c5, (IMAGE, IMAGE), min_area=2), labels == 3) < 0.5


def test_constant_features_give_no_proposals() -> None:
    proposals = saliency_proposals(torch.ones(16, 4, 4), (64, 64))
    assert proposals.masks.shape == (0, 64, 64)
    assert (
        proposals.scores.shape == (0,)
        and proposals.boxes.shape == (0, 4)
        and proposals.queries.shape == (0, 16)
    )


def test_bad_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match=r"\[C, h, w\]"):
        saliency_proposals(torch.randn(1, 8, 4, 4), (64, 64))
    bad = torch.randn(8, 4, 4)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        saliency_proposals(bad, (64, 64))
    with pytest.raises(ValueError, match="image_size"):
        saliency_proposals(torch.randn(8, 4, 4), (0, 64))
