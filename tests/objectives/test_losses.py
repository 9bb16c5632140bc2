from __future__ import annotations

import math

import pytest
import torch

from sp_ray.objectives.knet_criterion import KNetCriterion
from sp_ray.objectives.losses import dice_loss, mask_bce_loss, sigmoid_focal_loss
from sp_ray.objectives.matcher import HungarianMatcher
from sp_ray.types import ModelOutputs, StageOutput

LN2 = math.log(2.0)


def test_sigmoid_focal_loss_by_hand() -> None:
    # (logit 0, target 1): p_t = 0.5, alpha_t = 0.25, ce = ln 2 -> 0.25 * 0.5^2 * ln 2 = 0.043322.
    # (logit 2, target 0): p = sigmoid(2) = 0.880797, p_t = 1 - p, alpha_t = 0.75, ce = ln(1 + e^2) = 2.126928
    #   -> 0.75 * 0.880797^2 * 2.126928 = 1.237558.
    loss = sigmoid_focal_loss(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.043322 + 1.237558, abs=1e-5)
    # gamma = 0 reduces to alpha-weighted BCE: 0.25 ln 2 + 0.75 * 2.126928.
    loss0 = sigmoid_focal_loss(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]]), gamma=0.0)
    assert loss0.item() == pytest.approx(0.25 * LN2 + 0.75 * 2.126928, abs=1e-5)


def test_dice_loss_by_hand() -> None:
    # Row 0: p = 0.5 on 2 pixels, t = [1, 0]: 1 - 2 * 0.5 / (0.5 + 1 + 2e-3) = 0.334221.
    # Row 1: exact prediction of [1, 0] (logits +-30): 1 - 2 / (1 + 1 + 2e-3) = 0.000999.
    logits = torch.tensor([[0.0, 0.0], [30.0, -30.0]])
    loss = dice_loss(logits, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(loss, torch.tensor([0.334221, 0.000999]), atol=1e-6, rtol=0)


def test_mask_bce_loss_by_hand() -> None:
    # BCE(0, 1) = ln 2, BCE(2, 1) = ln(1 + e^-2) = 0.126928, BCE(0, 0) = ln 2,
    # BCE(-2, 0.5) = 0.5 * 2 + ln(1 + e^-2) = 1.126928.
    loss = mask_bce_loss(torch.tensor([[0.0, 2.0], [0.0, -2.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.5]]))
    assert loss.item() == pytest.approx((LN2 + 0.126928 + LN2 + 1.126928) / 4, abs=1e-5)
    empty = torch.zeros(0, 4, requires_grad=True)
    zero = mask_bce_loss(empty, torch.zeros(0, 4))
    assert zero.item() == 0.0 and zero.requires_grad


def _outputs(batch: int, n: int, c: int, h: int, w: int, stages: int = 2, seed: int = 0) -> ModelOutputs:
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_()

    stage_outs = [
        StageOutput(
            pred_logits=leaf(batch, n, c), pred_masks=leaf(batch, n, h, w), pred_kernels=leaf(batch, n, 4)
        )
        for _ in range(stages)
    ]
    return ModelOutputs(
        **stage_outs[-1],
        aux_outputs=stage_outs[:-1],
        init_masks=leaf(batch, n, h, w),
        init_kernels=leaf(batch, n, 4),
    )


def _target(labels: list[int], masks: torch.Tensor) -> dict:
    size = tuple(masks.shape[-2:])
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
        "boxes": torch.zeros(len(labels), 4),
        "image_id": 0,
        "orig_size": size,
        "image_size": size,
    }


def _random_masks(k: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(k, *size, dtype=torch.bool)
    for i in range(k):
        y, x = torch.randint(0, size[0] // 2, (2,), generator=g).tolist()
        masks[i, y : y + size[0] // 2, x : x + size[1] // 2] = True
    return masks


EXPECTED_KEYS = {
    "loss_mask_s0", "loss_dice_s0", "loss_cls_s1", "loss_mask_s1", "loss_dice_s1",
    "loss_cls_s2", "loss_mask_s2", "loss_dice_s2",
}  # fmt: skip


@pytest.mark.parametrize("num_targets", [0, 1, 12])
def test_criterion_is_finite_and_backpropagates(num_targets: int) -> None:
    n, c, h, w = 8, 3, 4, 6
    outputs = _outputs(2, n, c, h, w)
    size = (h * 8, w * 8)
    targets = [
        _target([i % c for i in range(num_targets)], _random_masks(num_targets, size, seed=1)),
        _target([], torch.zeros(0, *size, dtype=torch.bool)),
    ]
    criterion = KNetCriterion(num_classes=c, matcher=HungarianMatcher())
    losses, matches = criterion(outputs, targets, return_matches=True)
    assert set(losses) == EXPECTED_KEYS
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad is not None and outputs["init_masks"].grad is not None
    assert len(matches) == 3
    assert all(len(m[0][0]) == min(n, num_targets) and len(m[1][0]) == 0 for m in matches)
    if num_targets == 0:
        assert all(losses[k].item() == 0.0 for k in EXPECTED_KEYS if not k.startswith("loss_cls"))
        # With nothing to find, the class loss still pushes every kernel towards background.
        assert losses["loss_cls_s2"].item() > 0 and outputs["pred_logits"].grad.abs().sum() > 0


def test_criterion_values_by_hand() -> None:
    """One image, one full-image target, N = 2, C = 1, all logits 0 (every probability 0.5).

    cls: positive term 0.25 * 0.5^2 ln 2 plus negative term 0.75 * 0.5^2 ln 2 = 0.25 ln 2, over 1 match, x 2.
    mask: BCE ln 2 x 1. dice at stride 4 (4 x 4 pixels, target all ones):
    1 - 2 * 8 / (16 * 0.25 + 16 + 2e-3), x 4.
    """
    n, h, w = 2, 2, 2
    zero = lambda *s: torch.zeros(*s, requires_grad=True)  # noqa: E731
    stage = StageOutput(pred_logits=zero(1, n, 1), pred_masks=zero(1, n, h, w), pred_kernels=zero(1, n, 4))
    outputs = ModelOutputs(**stage, aux_outputs=[], init_masks=zero(1, n, h, w), init_kernels=zero(1, n, 4))
    targets = [_target([0], torch.ones(1, 16, 16, dtype=torch.bool))]
    losses = KNetCriterion(num_classes=1, matcher=HungarianMatcher())(outputs, targets)
    dice = 1 - 16 / (4 + 16 + 2e-3)
    assert losses["loss_cls_s1"].item() == pytest.approx(2 * 0.25 * LN2, abs=1e-6)
    assert losses["loss_mask_s1"].item() == pytest.approx(LN2, abs=1e-6)
    assert losses["loss_dice_s1"].item() == pytest.approx(4 * dice, abs=1e-6)
    assert losses["loss_mask_s0"].item() == pytest.approx(LN2, abs=1e-6)
    assert losses["loss_dice_s0"].item() == pytest.approx(4 * dice, abs=1e-6)


def test_criterion_weights_scale_losses() -> None:
    outputs = _outputs(1, 4, 2, 2, 2, stages=1)
    targets = [_target([1], _random_masks(1, (16, 16), seed=3))]
    base = KNetCriterion(num_classes=2, matcher=HungarianMatcher())(outputs, targets)
    doubled = KNetCriterion(
        num_classes=2, matcher=HungarianMatcher(), cls_weight=4.0, mask_weight=2.0, dice_weight=8.0,
        init_mask_weight=2.0, init_dice_weight=8.0,
    )(outputs, targets)  # fmt: skip
    for key, value in base.items():
        assert doubled[key].item() == pytest.approx(2 * value.item(), rel=1e-6)


def test_target_borders_are_soft_at_stride_four() -> None:
    """A 2-pixel-wide column resized by 4 bilinearly becomes a column of 0.5, not a hard 0/1 column."""
    n, h, w = 1, 2, 2
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, :, 6:8] = True  # input columns 6-7 -> stride-4 column 1 samples input x = 5.5 -> value 0.5
    logits = torch.full((1, n, h, w), -30.0)
    stage = StageOutput(
        pred_logits=torch.zeros(1, n, 1), pred_masks=logits, pred_kernels=torch.zeros(1, n, 4)
    )
    outputs = ModelOutputs(**stage, aux_outputs=[], init_masks=logits, init_kernels=torch.zeros(1, n, 4))
    losses = KNetCriterion(num_classes=1, matcher=HungarianMatcher())(outputs, [_target([0], mask)])
    # Prediction ~0 everywhere; target 0.5 on one column of 4 pixels: sum t^2 = 4 * 0.25 = 1.
    assert losses["loss_dice_s1"].item() == pytest.approx(4 * 1.0, abs=1e-3)
    expected_bce = (4 * (0.5 * 30 + math.log1p(math.exp(-30)))) / 16
    assert losses["loss_mask_s1"].item() == pytest.approx(expected_bce, rel=1e-4)


def _two_kernel_stage(best_kernel: int) -> StageOutput:
    """Stage output whose kernel `best_kernel` predicts the left half of a 2 x 2 map, the other the right."""
    masks = torch.full((1, 2, 2, 2), -10.0)
    masks[0, best_kernel, :, 0] = 10.0
    masks[0, 1 - best_kernel, :, 1] = 10.0
    return StageOutput(pred_logits=torch.zeros(1, 2, 1), pred_masks=masks, pred_kernels=torch.zeros(1, 2, 4))


@pytest.mark.parametrize(("previous", "expected_stage2"), [(True, 0), (False, 1)])
def test_stage_matching_uses_previous_or_own_predictions(previous: bool, expected_stage2: int) -> None:
    stage1, stage2 = _two_kernel_stage(0), _two_kernel_stage(1)
    outputs = ModelOutputs(
        **stage2, aux_outputs=[stage1], init_masks=stage1["pred_masks"], init_kernels=torch.zeros(1, 2, 4)
    )
    left = torch.zeros(1, 16, 16, dtype=torch.bool)
    left[0, :, :8] = True
    criterion = KNetCriterion(num_classes=1, matcher=HungarianMatcher(), match_previous_stage=previous)
    _, matches = criterion(outputs, [_target([0], left)], return_matches=True)
    assert matches[0][0][0].tolist() == [0]
    assert matches[1][0][0].tolist() == [0]
    assert matches[2][0][0].tolist() == [expected_stage2]


def test_criterion_rejects_bad_targets() -> None:
    outputs = _outputs(1, 4, 2, 2, 2, stages=1)
    criterion = KNetCriterion(num_classes=2, matcher=HungarianMatcher())
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        criterion(outputs, [_target([2], _random_masks(1, (16, 16), seed=0))])
    with pytest.raises(ValueError, match="padded input size"):
        criterion(outputs, [_target([0], _random_masks(1, (16, 24), seed=0))])
    with pytest.raises(ValueError, match="batch"):
        criterion(outputs, [])
    with pytest.raises(ValueError, match="mask_stride"):
        KNetCriterion(num_classes=2, matcher=HungarianMatcher(), mask_stride=3)


def test_criterion_reports_nan_predictions() -> None:
    outputs = _outputs(1, 4, 2, 2, 2, stages=1)
    with torch.no_grad():
        outputs["init_masks"][0, 1, 0, 0] = float("nan")
    criterion = KNetCriterion(num_classes=2, matcher=HungarianMatcher())
    with pytest.raises(ValueError, match="NaN"):
        criterion(outputs, [_target([0], _random_masks(1, (16, 16), seed=0))])
