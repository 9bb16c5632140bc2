from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sp_ray.evaluation.proposal_quality import (
    LinearProbe,
    best_iou_per_instance,
    fit_linear_probe,
    foreground_scores,
    mask_iou_matrix,
    probe_predict,
    proposal_recall,
    sample_pixel_features,
)


def _box(top: int, left: int, bottom: int, right: int, size: int = 10) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


@pytest.fixture
def hand_made() -> tuple[torch.Tensor, torch.Tensor]:
    """Three instances and three proposals with IoUs worked out by hand."""
    gt = torch.stack([
        _box(0, 0, 4, 4),  # 16 px
        _box(5, 5, 9, 9),  # 16 px
        _box(0, 6, 2, 10),  # 8 px, only touched by a proposal at IoU 1/4
    ])
    pred = torch.stack([
        _box(0, 0, 4, 2),  # 8 px inside gt 0: IoU 8 / 16 = 0.5
        _box(5, 5, 9, 9),  # equals gt 1: IoU 1
        _box(0, 4, 2, 8),  # 8 px, 4 of them in gt 2: IoU 4 / 12 = 1/3; touches nothing else
    ])
    return pred, gt


def test_mask_iou_matrix_values(hand_made) -> None:
    pred, gt = hand_made
    expected = torch.tensor([
        [0.5, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1 / 3],
    ])
    assert torch.allclose(mask_iou_matrix(pred, gt), expected)


def test_best_iou_and_recall_threshold_is_inclusive(hand_made) -> None:
    pred, gt = hand_made
    best = best_iou_per_instance(pred, gt)
    assert torch.allclose(best, torch.tensor([0.5, 1.0, 1 / 3]))
    summary = proposal_recall(best, thresholds=(0.5, 0.75, 0.3))
    assert summary.instances == 3
    assert summary.recall[0.5] == pytest.approx(2 / 3)  # IoU exactly 0.5 counts
    assert summary.recall[0.75] == pytest.approx(1 / 3)
    assert summary.recall[0.3] == pytest.approx(1.0)
    assert summary.mean_best_iou == pytest.approx((0.5 + 1.0 + 1 / 3) / 3)


def test_one_proposal_may_recall_several_instances() -> None:
    gt = torch.stack([_box(0, 0, 4, 4), _box(0, 0, 4, 5)])  # 16 and 20 px, nested
    pred = _box(0, 0, 4, 4)[None]
    assert torch.allclose(best_iou_per_instance(pred, gt), torch.tensor([1.0, 0.8]))


def test_no_proposals_and_no_instances() -> None:
    gt = torch.stack([_box(0, 0, 4, 4), _box(5, 5, 9, 9)])
    assert torch.equal(best_iou_per_instance(torch.zeros(0, 10, 10, dtype=torch.bool), gt), torch.zeros(2))
    assert best_iou_per_instance(gt, torch.zeros(0, 10, 10, dtype=torch.bool)).shape == (0,)
    empty = proposal_recall([torch.zeros(0), torch.zeros(0)])
    assert empty.instances == 0 and math.isnan(empty.recall[0.5]) and math.isnan(empty.mean_best_iou)


def test_recall_pools_images() -> None:
    summary = proposal_recall([torch.tensor([0.9, 0.1]), torch.tensor([0.6]), torch.zeros(0)])
    assert summary.instances == 3
    assert summary.recall[0.5] == pytest.approx(2 / 3)
    assert summary.mean_best_iou == pytest.approx(1.6 / 3)


def test_bad_inputs_are_rejected(hand_made) -> None:
    pred, gt = hand_made
    with pytest.raises(ValueError, match="one image size"):
        mask_iou_matrix(pred[:, :5], gt)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        proposal_recall(torch.ones(2), thresholds=(0.0,))


def test_sampled_features_equal_bilinear_upsampling() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 3, 4, 5)
    labels = torch.rand(2, 12, 15) > 0.5
    generator = torch.Generator().manual_seed(0)
    x, y = sample_pixel_features(features, labels, per_image=50, generator=generator)
    assert x.shape == (100, 3) and y.shape == (100,) and y.dtype == torch.bool
    # Draw the same positions again and read them from the fully upsampled map.
    generator = torch.Generator().manual_seed(0)
    ys = torch.randint(12, (2, 50), generator=generator)
    xs = torch.randint(15, (2, 50), generator=generator)
    up = F.interpolate(features, size=(12, 15), mode="bilinear", align_corners=False)
    index = torch.arange(2)[:, None]
    assert torch.allclose(x, up.permute(0, 2, 3, 1)[index, ys, xs].reshape(100, 3), atol=1e-5)
    assert torch.equal(y, labels[index, ys, xs].reshape(100))


def _separable(seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [1, 4, S, S]: channel 0 - channel 1 > 0 exactly on the foreground; channels 2, 3 noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(1, size, size, dtype=torch.bool)
    labels[0, 3:10, 4:12] = True
    labels[0, 12:15, 1:5] = True
    sign = labels.float() * 2 - 1  # (1, S, S)
    noise = torch.randn(1, 4, size, size, generator=generator)
    features = torch.cat([
        2.0 * sign[:, None] + 0.3 * noise[:, :1] + 1.0,
        -2.0 * sign[:, None] + 0.3 * noise[:, 1:2] + 1.0,
        noise[:, 2:],
    ], dim=1)
    return features, labels


def test_probe_separates_a_linearly_separable_feature_map() -> None:
    train_feats, train_labels = _separable(0)
    x, y = sample_pixel_features(train_feats, train_labels, per_image=400,
                                 generator=torch.Generator().manual_seed(1))
    probe = fit_linear_probe(x, y)
    assert probe.weight[0] > 0 > probe.weight[1]
    val_feats, val_labels = _separable(2)
    pred = probe_predict(probe, val_feats, (16, 16))
    scores = foreground_scores(pred, val_labels)
    assert scores.accuracy == 1.0 and scores.foreground_iou == 1.0
    assert scores.pixels == 256
    assert scores.foreground_fraction == pytest.approx(float(val_labels.float().mean()))


def test_probe_logits_upsample_like_features() -> None:
    torch.manual_seed(0)
    probe = LinearProbe(weight=torch.randn(3), bias=torch.tensor(0.2), mean=torch.randn(3),
                        std=torch.rand(3) + 0.5)
    features = torch.randn(2, 3, 4, 4)
    up = F.interpolate(features, size=(9, 7), mode="bilinear", align_corners=False)
    assert torch.equal(probe_predict(probe, features, (9, 7)), probe.logits(up) > 0)
    manual = ((up - probe.mean.view(1, 3, 1, 1)) / probe.std.view(1, 3, 1, 1) * probe.weight.view(1, 3, 1, 1))
    assert torch.allclose(probe.logits(up), manual.sum(1) + probe.bias, atol=1e-5)


def test_probe_needs_both_classes_and_finite_features() -> None:
    x = torch.randn(20, 3)
    with pytest.raises(ValueError, match="foreground and background"):
        fit_linear_probe(x, torch.ones(20, dtype=torch.bool))
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_linear_probe(x, torch.arange(20) % 2 == 0)


def test_foreground_scores_pool_images() -> None:
    pred = [_box(0, 0, 4, 4), torch.zeros(10, 10, dtype=torch.bool)]
    truth = [_box(0, 0, 4, 2), _box(0, 0, 1, 2)]
    scores = foreground_scores(pred, truth)
    # Image 1: 8 false positives; image 2: 2 false negatives. Pooled: inter 8, union 16 + 2.
    assert scores.pixels == 200
    assert scores.accuracy == pytest.approx(190 / 200)
    assert scores.foreground_iou == pytest.approx(8 / 18)
    assert scores.foreground_fraction == pytest.approx(10 / 200)
    with pytest.raises(ValueError, match="differ in shape"):
        foreground_scores(pred[0], truth[0][:5])
    assert math.isnan(foreground_scores(pred[1], pred[1]).foreground_iou)


def test_probe_predict_batched_equals_single_image() -> None:
    features = torch.cat([_separable(3)[0], _separable(4)[0]])  # (2, 4, 16, 16)
    probe = LinearProbe(weight=torch.tensor([1.0, -1.0, 0.1, 0.0]), bias=torch.tensor(0.0),
                        mean=torch.zeros(4), std=torch.ones(4))
    batched = probe_predict(probe, features, (32, 32))
    assert batched.shape == (2, 32, 32)
    for row in range(2):
        assert torch.equal(batched[row], probe_predict(probe, features[row : row + 1], (32, 32))[0])
