"""FreeSOLO's weak mask losses: hand-computed values, zeros where they must be zero, and the criterion option."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sp_ray.config import load_config
from sp_ray.data.transforms import collate
from sp_ray.models import build_model
from sp_ray.models.knet import build_knet
from sp_ray.objectives import build_objective
from sp_ray.objectives.knet_criterion import KNetCriterion
from sp_ray.objectives.matcher import HungarianMatcher
from sp_ray.objectives.weak_mask_losses import (
    box_targets,
    color_affinity,
    pairwise_affinity_loss,
    projection_dice_loss,
    rgb_to_lab,
    unfold_neighbours,
)
from sp_ray.types import ModelOutputs, StageOutput

EPS = 1e-5  # FreeSOLO's dice smoothing
BIG = 30.0  # a logit whose sigmoid is 0 or 1 to float precision


def test_rgb_to_lab_known_colours() -> None:
    # skimage.color.rgb2lab values (D65): white, black, pure red, pure green, mid grey.
    rgb = torch.tensor([[255.0, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [128, 128, 128]]).T[:, :, None]
    lab = rgb_to_lab(rgb)[..., 0].T
    expected = torch.tensor(
        [[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
         [53.5850, 0.0, 0.0]]
    )  # fmt: skip
    torch.testing.assert_close(lab, expected, atol=0.01, rtol=0)


def test_unfold_neighbours_are_the_dilated_ring() -> None:
    x = torch.arange(35.0).reshape(1, 1, 5, 7)
    out = unfold_neighbours(x)
    assert out.shape == (1, 1, 8, 5, 7)
    offsets = [(-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2)]
    for k, (dy, dx) in enumerate(offsets):
        for i in range(5):
            for j in range(7):
                inside = 0 <= i + dy < 5 and 0 <= j + dx < 7
                expected = x[0, 0, i + dy, j + dx].item() if inside else 0.0
                assert out[0, 0, k, i, j].item() == expected


def test_projection_dice_by_hand() -> None:
    # Prediction p = 0.5 everywhere on 4 x 4; target: rows 0-1, columns 0-2 (a 2 x 3 box).
    logits = torch.zeros(1, 4, 4)
    target = torch.zeros(1, 4, 4)
    target[0, :2, :3] = 1
    # max over rows (one value per column): p = [.5]*4, t = [1, 1, 1, 0]:
    #   1 - 2 * 1.5 / (4 * .25 + 3 + eps); max over columns: t = [1, 1, 0, 0]: 1 - 2 * 1 / (1 + 2 + eps).
    expected_max = (1 - 3 / (4 + EPS)) + (1 - 2 / (3 + EPS))
    # mean over rows: t = [.5, .5, .5, 0]: 1 - 2 * .75 / (1 + .75 + eps); mean over columns: t = [.75, .75, 0, 0]:
    #   1 - 2 * .75 / (1 + 1.125 + eps).
    expected_mean = (1 - 1.5 / (1.75 + EPS)) + (1 - 1.5 / (2.125 + EPS))
    assert projection_dice_loss(logits, target, reduce="max").item() == pytest.approx(expected_max, abs=1e-6)
    assert projection_dice_loss(logits, target, reduce="mean").item() == pytest.approx(expected_mean, abs=1e-6)


def test_max_projection_is_zero_for_any_mask_filling_the_box() -> None:
    # A cross that touches every row and column of the box has the box's max-projections: the weak loss
    # does not care about the shape inside, which is what makes it robust to noisy pseudo masks.
    target = torch.zeros(1, 6, 6)
    target[0, 1:5, 1:5] = 1
    cross = torch.full((1, 6, 6), -BIG)
    cross[0, 2, 1:5] = BIG
    cross[0, 1:5, 2] = BIG
    assert projection_dice_loss(cross, target, reduce="max").item() == pytest.approx(0.0, abs=1e-5)
    # The average projections see the difference.
    assert projection_dice_loss(cross, target, reduce="mean").item() > 0.1
    exact = torch.where(target > 0, BIG, -BIG)
    assert projection_dice_loss(exact, target, reduce="mean").item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="reduce"):
        projection_dice_loss(exact, target, reduce="sum")


def test_box_targets_fill_the_box() -> None:
    ell = torch.zeros(1, 5, 5)
    ell[0, 1:4, 1] = 1
    ell[0, 3, 1:4] = 1
    expected = torch.zeros(1, 5, 5)
    expected[0, 1:4, 1:4] = 1
    assert torch.equal(box_targets(ell), expected)


def test_pairwise_loss_by_hand() -> None:
    # A 1 x 4 map: each pixel's only in-map neighbour is two columns away (dilation 2), so the pairs are
    # (0, 2), (1, 3) and their mirrors. P(same) = p_i p_j + (1 - p_i)(1 - p_j).
    logits = torch.tensor([[[0.0, 2.0, -1.0, 3.0]]])
    p = torch.sigmoid(logits[0, 0]).tolist()
    affinity = unfold_neighbours(torch.ones(1, 1, 1, 4))[0]  # 1 where the neighbour is in the map
    boxes = torch.ones(1, 1, 4)

    def nll(i: int, j: int) -> float:
        return -math.log(p[i] * p[j] + (1 - p[i]) * (1 - p[j]))

    expected = (2 * nll(0, 2) + 2 * nll(1, 3)) / 4
    assert pairwise_affinity_loss(logits, affinity, boxes).item() == pytest.approx(expected, abs=1e-6)
    # Pixels outside the box do not count as a centre: only pixels 0 and 1 remain.
    boxes = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    expected = (nll(0, 2) + nll(1, 3)) / 2
    assert pairwise_affinity_loss(logits, affinity, boxes).item() == pytest.approx(expected, abs=1e-6)


def test_pairwise_loss_is_zero_without_similar_pairs_and_for_agreeing_pixels() -> None:
    logits = torch.randn(2, 6, 6, requires_grad=True)
    zero = pairwise_affinity_loss(logits, torch.zeros(2, 8, 6, 6), torch.ones(2, 6, 6))
    assert zero.item() == 0.0 and zero.requires_grad
    confident = torch.full((1, 6, 6), BIG)
    affinity = torch.ones(1, 8, 6, 6)
    assert pairwise_affinity_loss(confident, affinity, torch.ones(1, 6, 6)).item() == pytest.approx(0.0, abs=1e-6)


def test_color_affinity_splits_colours_and_ignores_padding() -> None:
    # 16 x 24 input, stride 4 -> a 4 x 6 grid: red columns 0-2, green columns 3-5; the valid image is 16 x 16
    # (grid columns 0-3), the rest is padding.
    image = torch.zeros(3, 16, 24, dtype=torch.uint8)
    image[0, :, :12] = 255
    image[1, :, 12:] = 255
    affinity = color_affinity(image, image_size=(16, 16), stride=4, threshold=0.3)
    assert affinity.shape == (8, 4, 6)
    right = 4  # neighbour (0, +2)
    assert affinity[right, 1, 0].item() == 1.0  # red - red
    assert affinity[right, 1, 1].item() == 0.0  # red (col 1) - green (col 3)
    assert affinity[right, 1, 2].item() == 0.0  # red (col 2) - green (col 4, padding)
    assert affinity[:, :, 4:].sum().item() == 0.0  # centres in the padding
    left = 3  # neighbour (0, -2)
    assert affinity[left, 1, 2].item() == 1.0 and affinity[left, 1, 0].item() == 0.0  # col -2 is outside
    with pytest.raises(ValueError, match="divisible"):
        color_affinity(torch.zeros(3, 18, 24), image_size=(18, 24), stride=4)


H, W = 64, 64


def _outputs(mask_logits: torch.Tensor) -> ModelOutputs:
    """One stage whose masks (stride 8) are given; class logits favour nothing."""
    batch, n = mask_logits.shape[:2]
    stage = StageOutput(
        pred_logits=torch.zeros(batch, n, 1), pred_masks=mask_logits, pred_kernels=torch.zeros(batch, n, 4)
    )
    return ModelOutputs(**stage, aux_outputs=[], init_masks=mask_logits, init_kernels=torch.zeros(batch, n, 4))


def _batch() -> tuple[torch.Tensor, list[dict]]:
    """One 64 x 64 image: a red square (rows/cols 16-47) on grey, through collate (which attaches the image)."""
    image = torch.full((3, H, W), 128, dtype=torch.uint8)
    image[:, 16:48, 16:48] = torch.tensor([220, 30, 30], dtype=torch.uint8)[:, None, None]
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, 16:48, 16:48] = True
    target = {
        "labels": torch.tensor([0]), "masks": mask, "boxes": torch.tensor([[16.0, 16, 48, 48]]), "image_id": 1,
        "orig_size": (H, W), "image_size": (H, W),
    }  # fmt: skip
    return collate([(image, target)])


def _criterion(**kwargs) -> KNetCriterion:
    return KNetCriterion(num_classes=1, matcher=HungarianMatcher(), mask_loss="weak", **kwargs)


def test_weak_criterion_names_weights_and_zero_for_the_exact_mask() -> None:
    _, targets = _batch()
    assert targets[0]["image"].shape == (3, H, W)
    exact = torch.full((1, 2, 8, 8), -BIG)
    exact[0, 0, 2:6, 2:6] = BIG  # the square at stride 8
    criterion = _criterion(pairwise_warmup_iters=0)
    losses = criterion(_outputs(exact), targets)
    expected = {f"{name}_s{i}" for i in (0, 1) for name in ("loss_proj", "loss_proj_avg", "loss_pairwise")}
    assert set(losses) == expected | {"loss_cls_s1"}
    for name, value in losses.items():
        if name != "loss_cls_s1":
            assert value.item() == pytest.approx(0.0, abs=2e-3), name


def test_weak_criterion_values_match_the_functions_and_the_warmup_ramps() -> None:
    _, targets = _batch()
    logits = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    criterion = _criterion(
        projection_weight=2.0, avg_projection_weight=0.5, pairwise_weight=3.0, pairwise_warmup_iters=4
    )
    losses, matches = criterion(_outputs(logits), targets, return_matches=True)
    pred_idx = matches[1][0][0]
    up = torch.nn.functional.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)[0, pred_idx]
    target = torch.nn.functional.interpolate(targets[0]["masks"][None].float(), size=(16, 16), mode="bilinear")[0]
    affinity = color_affinity(targets[0]["image"], image_size=(H, W), stride=4)
    assert losses["loss_proj_s1"].item() == pytest.approx(2.0 * projection_dice_loss(up, target).item(), rel=1e-5)
    assert losses["loss_proj_avg_s1"].item() == pytest.approx(
        0.5 * projection_dice_loss(up, target, reduce="mean").item(), rel=1e-5
    )
    pairwise = pairwise_affinity_loss(up, affinity[None], box_targets(target)).item()
    assert losses["loss_pairwise_s1"].item() == pytest.approx(3.0 * pairwise / 4, rel=1e-5)  # call 1 of 4
    for _ in range(4):
        losses = criterion(_outputs(logits), targets)
    assert losses["loss_pairwise_s1"].item() == pytest.approx(3.0 * pairwise, rel=1e-5)  # warmed up
    sum(losses.values()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    criterion.eval()
    criterion(_outputs(logits), targets)
    assert criterion.calls == 5  # evaluation calls do not advance the warmup


def test_weak_criterion_without_targets_and_without_image() -> None:
    _, targets = _batch()
    empty = {**targets[0], "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, H, W, dtype=torch.bool)}
    logits = torch.randn(1, 2, 8, 8, requires_grad=True)
    losses = _criterion()(_outputs(logits), [empty])
    assert losses["loss_proj_s1"].item() == 0.0 and losses["loss_pairwise_s1"].requires_grad
    no_image = {k: v for k, v in targets[0].items() if k != "image"}
    with pytest.raises(ValueError, match="needs the target's 'image'"):
        _criterion()(_outputs(logits), [no_image])
    with pytest.raises(ValueError, match="mask_loss"):
        KNetCriterion(num_classes=1, matcher=HungarianMatcher(), mask_loss="boxes")


def test_build_objective_passes_the_option_and_the_full_default_is_unchanged() -> None:
    cfg = load_config(None, ["model.num_classes=1", "model.depth=18", "loss.mask_loss=weak", "loss.pairwise_weight=2"])
    criterion = build_objective(cfg, build_model(cfg)).criterion
    assert criterion.mask_loss == "weak" and criterion.pairwise_weight == 2.0
    _, targets = _batch()
    logits = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    full = KNetCriterion(num_classes=1, matcher=HungarianMatcher())(_outputs(logits), targets)
    assert list(full) == ["loss_mask_s0", "loss_dice_s0", "loss_cls_s1", "loss_mask_s1", "loss_dice_s1"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weak_losses_train_a_tiny_knet(seed: int, one_thread) -> None:
    """The weak losses alone (noisy pseudo mask: the square with a bite taken out) still fit the square.

    The pseudo mask's own IoU with the square is 880 / 1024 = 0.86 and it holds none of the bite; after 30 steps
    the best kernel's mask (upsampled to the image, sigmoid > 0.5) must overlap the whole square better than
    that, bite included (seen: IoU 0.91-0.92, bite 0.97-0.99 filled over seeds 0-3)."""
    torch.manual_seed(seed)
    images, targets = _batch()
    square = targets[0]["masks"][0].clone()
    targets[0]["masks"][0, 16:28, 16:28] = False  # the pseudo mask misses a corner of the object
    model = build_knet(
        num_classes=1, depth=18, frozen_stages=4, num_kernels=4, num_stages=1, feat_channels=32, ffn_channels=64,
        num_heads=2,
    )  # fmt: skip
    criterion = _criterion(pairwise_warmup_iters=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def fit_of_the_best_kernel() -> tuple[float, float]:
        """(IoU with the square, share of the bite inside the mask) of the kernel that overlaps the square most."""
        with torch.no_grad():
            logits = model(images.float())["pred_masks"][0]  # (N, H/8, W/8)
        masks = F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=False)[0].sigmoid() > 0.5
        iou = (masks & square).flatten(1).sum(1) / (masks | square).flatten(1).sum(1).clamp(min=1)
        best = int(iou.argmax())
        return iou[best].item(), masks[best, 16:28, 16:28].float().mean().item()

    history = []
    for _ in range(30):
        losses = criterion(model(images.float()), targets)
        total = sum(v for k, v in losses.items() if not k.startswith("loss_cls"))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5
    iou, bite = fit_of_the_best_kernel()
    assert iou > 0.88, f"IoU {iou:.3f} with the square: no better than the pseudo mask's 0.86"
    assert bite > 0.8, f"only {bite:.2f} of the bite the pseudo mask misses is predicted"
