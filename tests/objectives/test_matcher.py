from __future__ import annotations

import itertools
import math

import pytest
import torch

from sp_ray.objectives.matcher import HungarianMatcher, dice_cost, focal_class_cost, mask_cost

BIG = 20.0  # a logit whose sigmoid is 1 to float precision


def _binary_logits(pixel_sets: list[set[int]], num_pixels: int) -> torch.Tensor:
    logits = torch.full((len(pixel_sets), num_pixels), -BIG)
    for row, pixels in enumerate(pixel_sets):
        logits[row, list(pixels)] = BIG
    return logits


def _binary_masks(pixel_sets: list[set[int]], num_pixels: int) -> torch.Tensor:
    return (_binary_logits(pixel_sets, num_pixels) > 0).float()


def test_focal_class_cost_by_hand() -> None:
    # p = sigmoid(0) = 0.5: pos = 0.25 * 0.25 * ln 2, neg = 0.75 * 0.25 * ln 2 -> cost = -0.125 ln 2.
    # p = sigmoid(ln 9) = 0.9: pos = 0.25 * 0.01 * -ln 0.9, neg = 0.75 * 0.81 * -ln 0.1.
    logits = torch.tensor([[0.0, math.log(9.0)]])
    cost = focal_class_cost(logits, torch.tensor([0, 1, 1]))
    expected_1 = 0.25 * 0.01 * -math.log(0.9) - 0.75 * 0.81 * -math.log(0.1)
    assert cost.shape == (1, 3)
    torch.testing.assert_close(cost, torch.tensor([[-0.125 * math.log(2), expected_1, expected_1]]))


def test_dice_and_mask_cost_by_hand() -> None:
    # Pred {0, 1} vs target {1, 2} over 4 pixels: dice = 2*1 / (2 + 2 + 2e-3); agreement = (1 + 1) / 4.
    pred = _binary_logits([{0, 1}], 4)
    target = _binary_masks([{1, 2}, {0, 1}], 4)
    torch.testing.assert_close(dice_cost(pred, target), torch.tensor([[-2 / 4.002, -4 / 4.002]]))
    torch.testing.assert_close(mask_cost(pred, target), torch.tensor([[-0.5, -1.0]]))
    # Soft predictions: p = 0.5 everywhere against target {0}: sum pt = 0.5, sum p^2 = 1, sum t^2 = 1.
    soft = torch.zeros(1, 4)
    torch.testing.assert_close(dice_cost(soft, _binary_masks([{0}], 4)), torch.tensor([[-1 / 2.002]]))
    torch.testing.assert_close(mask_cost(soft, target[:1]), torch.tensor([[-0.5]]))


def test_matcher_finds_optimum_where_greedy_fails() -> None:
    # Targets T0 = {0..3}, T1 = {4..7}; pred 0 = {0..6}, pred 1 = {2, 3}.
    # dice: p0-T0 0.727, p0-T1 0.545, p1-T0 0.667, p1-T1 0. Greedy takes p0-T0 first, then p1-T1.
    masks = _binary_logits([{0, 1, 2, 3, 4, 5, 6}, {2, 3}], 8).view(1, 2, 2, 4)
    targets = [
        {
            "labels": torch.tensor([0, 0]),
            "masks": _binary_masks([{0, 1, 2, 3}, {4, 5, 6, 7}], 8).view(2, 2, 4),
        }
    ]
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(None, masks[0], targets[0]["labels"], targets[0]["masks"])
    greedy_first = divmod(int(cost.argmin()), 2)
    assert greedy_first == (0, 0)
    greedy_total = cost[0, 0] + cost[1, 1]
    optimum_total = cost[0, 1] + cost[1, 0]
    assert optimum_total < greedy_total
    [(pred_idx, tgt_idx)] = matcher(None, masks, targets)
    assert pred_idx.tolist() == [0, 1] and tgt_idx.tolist() == [1, 0]
    assert pred_idx.dtype == tgt_idx.dtype == torch.int64


def _brute_force(cost_tensor: torch.Tensor) -> float:
    cost = cost_tensor.tolist()
    n, k = cost_tensor.shape
    if n >= k:
        return min(
            sum(cost[p][t] for t, p in enumerate(perm)) for perm in itertools.permutations(range(n), k)
        )
    return min(sum(cost[p][t] for p, t in enumerate(perm)) for perm in itertools.permutations(range(k), n))


@pytest.mark.parametrize(("n", "k"), [(5, 3), (4, 4), (3, 5)])
def test_matcher_total_cost_is_minimal(n: int, k: int) -> None:
    torch.manual_seed(n * 10 + k)
    logits = torch.randn(1, n, 4)
    masks = torch.randn(1, n, 3, 3) * 3
    targets = [{"labels": torch.randint(0, 4, (k,)), "masks": (torch.rand(k, 3, 3) > 0.5).float()}]
    matcher = HungarianMatcher()
    [(pred_idx, tgt_idx)] = matcher(logits, masks, targets)
    cost = matcher.cost_matrix(logits[0], masks[0], targets[0]["labels"], targets[0]["masks"])
    assert len(pred_idx) == min(n, k)
    assert pred_idx.tolist() == sorted(pred_idx.tolist())
    assert len(set(tgt_idx.tolist())) == len(tgt_idx)
    assert cost[pred_idx, tgt_idx].sum().item() == pytest.approx(_brute_force(cost), abs=1e-5)


def test_matcher_more_targets_than_kernels_matches_every_kernel() -> None:
    masks = torch.randn(1, 2, 4, 4)
    targets = [{"labels": torch.tensor([0, 1, 0]), "masks": (torch.rand(3, 4, 4) > 0.5).float()}]
    [(pred_idx, tgt_idx)] = HungarianMatcher()(torch.randn(1, 2, 2), masks, targets)
    assert pred_idx.tolist() == [0, 1]
    assert len(set(tgt_idx.tolist())) == 2 and set(tgt_idx.tolist()) <= {0, 1, 2}


def test_matcher_no_targets_gives_empty_indices() -> None:
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 4, 4)},
        {"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4)},
    ]
    (p0, t0), (p1, t1) = HungarianMatcher()(torch.randn(2, 3, 2), torch.randn(2, 3, 4, 4), targets)
    assert p0.numel() == t0.numel() == 0 and p0.dtype == torch.int64
    assert p1.numel() == t1.numel() == 1


def test_matcher_rejects_nan_and_size_mismatch() -> None:
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 4, 4)}]
    masks = torch.randn(1, 3, 4, 4)
    masks[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        HungarianMatcher()(None, masks, targets)
    with pytest.raises(ValueError, match="differ in size"):
        HungarianMatcher()(None, torch.randn(1, 3, 8, 8), targets)
    with pytest.raises(ValueError, match="batch"):
        HungarianMatcher()(None, torch.randn(2, 3, 4, 4), targets)
