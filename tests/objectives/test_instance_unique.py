"""Instance-unique querying: the memory, both losses by hand and at zero, the wrapper and its checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sp_ray.checkpoint import load_checkpoint, load_init_weights, save_checkpoint, split_legacy_state
from sp_ray.config import ConfigError, load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.models import build_model
from sp_ray.models.instance_unique import KNET_MASK_HEAD, MASK2FORMER_MASK_HEAD
from sp_ray.objectives import Trainable, build_objective
from sp_ray.objectives.instance_unique import (
    FeatureMemory,
    IUQObjective,
    Transform,
    apply_transform,
    feature_equivariance_loss,
    ground_truth_equivariance_loss,
    instance_balanced_weights,
    inter_scene_loss,
    mask_consistency_loss,
    sample_transform,
    transform_targets,
)
from sp_ray.objectives.knet_criterion import KNetCriterion
from sp_ray.objectives.matcher import HungarianMatcher
from sp_ray.train.loop import fit

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BIG = 30.0
# FL(x, 0) = 0.75 sigmoid(x)^2 softplus(x): x = 0 -> 0.75 * 0.25 * ln 2; x = 2 -> 1.237558 (test_losses).
FL0 = 0.75 * 0.25 * math.log(2.0)
FL2 = 1.237558


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- the memory -------------------------------------------------------------------------------------------


def test_memory_keeps_the_newest_images_pooled_and_detached() -> None:
    memory = FeatureMemory(capacity=3, resolution=2)
    first = torch.randn(2, 5, 8, 8, requires_grad=True)
    memory.push(first * 2, [1, 2])
    memory.push(torch.randn(2, 5, 8, 8), [3, 4])
    assert len(memory) == 3
    feats, ids, weights = memory.read(device=torch.device("cpu"))
    assert ids == [2, 3, 4] and feats.shape == (3, 5, 2, 2)
    assert torch.equal(weights, torch.full((3, 2, 2), 0.25))  # no weights pushed: every pixel 1/r^2
    torch.testing.assert_close(feats[0], F.adaptive_avg_pool2d(first[1] * 2, 2).detach())
    assert not feats.requires_grad and feats.grad_fn is None
    for step in range(10):
        memory.push(torch.randn(1, 5, 8, 8), [10 + step])
        assert len(memory) == 3
    assert memory.read(device=torch.device("cpu"))[1] == [17, 18, 19]
    with pytest.raises(ValueError, match="image ids"):
        memory.push(torch.randn(2, 5, 8, 8), [1])
    with pytest.raises(ValueError, match="pixel_weights"):
        memory.push(torch.randn(2, 5, 8, 8), [1, 2], torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="capacity"):
        FeatureMemory(capacity=0, resolution=2)


def test_memory_entries_are_copies_not_views() -> None:
    memory = FeatureMemory(capacity=2, resolution=4)
    feats = torch.ones(1, 2, 4, 4)
    memory.push(feats, [1])
    feats.mul_(5)
    assert memory.read(device=torch.device("cpu"))[0].max().item() == 1.0


# ---- inter-scene loss ---------------------------------------------------------------------------------------


def test_inter_scene_loss_by_hand() -> None:
    cross = torch.tensor([0.0, 2.0]).reshape(1, 1, 2, 1, 1)  # one query on two memory entries
    only_first = inter_scene_loss(cross, torch.tensor([[True, False]]))
    assert only_first.item() == pytest.approx(FL0, abs=1e-6)
    both = inter_scene_loss(cross, torch.tensor([[True, True]]))
    assert both.item() == pytest.approx((FL0 + FL2) / 2, abs=1e-5)
    logits = torch.randn(2, 3, 2, 4, 4, requires_grad=True)
    none = inter_scene_loss(logits, torch.zeros(2, 2, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    silent = inter_scene_loss(torch.full((2, 3, 2, 4, 4), -BIG), torch.ones(2, 2, dtype=torch.bool))
    assert silent.item() == pytest.approx(0.0, abs=1e-12)
    # Pixel weights: one query, one entry, two pixels with logits 0 and 2, weighted 1/4 and 3/4.
    row = torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 1, 2)
    assert inter_scene_loss(row, torch.tensor([[True]])).item() == pytest.approx((FL0 + FL2) / 2, abs=1e-5)
    weighted = inter_scene_loss(row, torch.tensor([[True]]), torch.tensor([[[0.25, 0.75]]]))
    assert weighted.item() == pytest.approx(0.25 * FL0 + 0.75 * FL2, abs=1e-5)


def test_instance_balanced_weights_by_hand() -> None:
    # One instance covering the top-left quarter of an 8x8 image, features 2x2, memory 2x2: the instance's
    # cell gets 1/2, the three background cells 1/2 together.
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    expected = torch.tensor([[1 / 2, 1 / 6], [1 / 6, 1 / 6]])
    torch.testing.assert_close(instance_balanced_weights(masks, (2, 2), 2), expected)
    # Two instances (top-left cell, bottom-right cell) and two background cells: 1/3 per region.
    two = torch.zeros(2, 8, 8, dtype=torch.bool)
    two[0, :4, :4] = True
    two[1, 4:, 4:] = True
    expected = torch.tensor([[1 / 3, 1 / 6], [1 / 6, 1 / 3]])
    torch.testing.assert_close(instance_balanced_weights(two, (2, 2), 2), expected)
    # An image covered by one instance has no background region; an image without instances weighs uniformly.
    torch.testing.assert_close(instance_balanced_weights(torch.ones(1, 8, 8, dtype=torch.bool), (2, 2), 2),
                               torch.full((2, 2), 0.25))
    torch.testing.assert_close(instance_balanced_weights(torch.zeros(0, 8, 8, dtype=torch.bool), (2, 2), 2),
                               torch.full((2, 2), 0.25))
    # Half a cell covered: the cell's instance share is 1/2, its background share 1/2.
    half = torch.zeros(1, 8, 8, dtype=torch.bool)
    half[0, :4, :2] = True
    weights = instance_balanced_weights(half, (2, 2), 2)
    # instance: all of it in cell (0, 0); background areas 0.5, 1, 1, 1 (of 3.5) -> 0.5 * (1 + 0.5 / 3.5).
    assert weights[0, 0].item() == pytest.approx(0.5 + 0.5 * 0.5 / 3.5, abs=1e-6)
    assert weights[1, 1].item() == pytest.approx(0.5 / 3.5, abs=1e-6)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)


def _tiny_knet_config(*extra: str):
    return load_config(
        CONFIGS / "demo" / "knet_tiny_synthetic.yaml",
        ["model.num_classes=2", "model.num_kernels=4", "model.feat_channels=32", "model.ffn_channels=32",
         "model.num_heads=2", *extra],
    )  # fmt: skip


def _trainable(cfg) -> Trainable:
    model = build_model(cfg)
    return Trainable(model, build_objective(cfg, model))


def _images_and_targets(ids: list[int], seed: int) -> tuple[torch.Tensor, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(ids), 3, 64, 64, generator=g) * 255
    targets = []
    for image_id in ids:
        masks = torch.zeros(1, 64, 64, dtype=torch.bool)
        y, x = torch.randint(0, 32, (2,), generator=g).tolist()
        masks[0, y : y + 24, x : x + 24] = True
        targets.append({
            "labels": torch.tensor([image_id % 2]), "masks": masks,
            "boxes": torch.tensor([[x, y, x + 24, y + 24]], dtype=torch.float32), "image_id": image_id,
            "orig_size": (64, 64), "image_size": (64, 64),
        })  # fmt: skip
    return images, targets


def test_knet_mask_head_reproduces_the_models_own_masks() -> None:
    torch.manual_seed(0)
    model = build_model(_tiny_knet_config())
    images, _ = _images_and_targets([1, 2], seed=0)
    features = model.forward_features(images)
    outputs = model.forward_from_features(features)
    cross = KNET_MASK_HEAD.masks(model, outputs["pred_kernels"], KNET_MASK_HEAD.features(features))
    assert cross.shape == (2, 4, 2, 8, 8)
    for b in range(2):
        torch.testing.assert_close(cross[b, :, b], outputs["pred_masks"][b], atol=1e-4, rtol=1e-4)


def test_mask2former_mask_head_reproduces_the_models_own_masks() -> None:
    cfg = load_config(
        CONFIGS / "demo" / "mask2former_tiny_synthetic.yaml",
        ["model.num_classes=2", "model.num_kernels=4", "model.feat_channels=32", "model.encoder_layers=1"],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    images, _ = _images_and_targets([1, 2], seed=0)
    features = model.forward_features(images)
    outputs = model.forward_from_features(features)
    cross = MASK2FORMER_MASK_HEAD.masks(model, outputs["pred_kernels"], MASK2FORMER_MASK_HEAD.features(features))
    for b in range(2):
        torch.testing.assert_close(cross[b, :, b], outputs["pred_masks"][b], atol=1e-4, rtol=1e-4)


def test_memory_fills_after_the_loss_and_never_leaks_gradients_across_steps() -> None:
    torch.manual_seed(0)
    model = _trainable(_tiny_knet_config("iuq.inter_scene_weight=1.0", "iuq.memory_size=3"))
    assert isinstance(model.objective, IUQObjective)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    values = []
    for step, ids in enumerate(([1, 2], [3, 4], [5, 6])):
        images, targets = _images_and_targets(ids, seed=step)
        losses = model(images, targets)
        values.append(losses["loss_inter_scene"].item())
        optimizer.zero_grad()
        # A second step whose loss reached a graph of the first would fail here ("backward through the graph
        # a second time") or keep it alive; the memory holds detached leaves only.
        sum(losses.values()).backward()
        optimizer.step()
        feats, memory_ids, _ = model.objective.memory.read(device=torch.device("cpu"))
        assert memory_ids == [1, 2, 3, 4, 5, 6][max(0, 2 * step + 2 - 3) : 2 * step + 2]
        assert not feats.requires_grad and feats.grad_fn is None
    assert values[0] == 0.0 and values[1] > 0 and values[2] > 0


def test_an_image_is_never_its_own_negative() -> None:
    torch.manual_seed(0)
    model = _trainable(_tiny_knet_config("iuq.inter_scene_weight=1.0"))
    images, targets = _images_and_targets([7], seed=0)
    model(images, targets)
    assert model(images, targets)["loss_inter_scene"].item() == 0.0  # memory: image 7 only
    other, other_targets = _images_and_targets([8], seed=1)
    assert model(other, other_targets)["loss_inter_scene"].item() > 0


def test_inter_scene_loss_falls_when_trained() -> None:
    torch.manual_seed(0)
    model = _trainable(_tiny_knet_config("iuq.inter_scene_weight=1.0", "iuq.memory_size=2"))
    memory_images, _ = _images_and_targets([1, 2], seed=1)
    images, targets = _images_and_targets([3], seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        # Refill with images 1 and 2 (capacity 2), which the step below is then pushed away from.
        model.objective.memory.push(model.model.forward_features(memory_images).x_feats, [1, 2])
        loss = model(images, targets)["loss_inter_scene"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0]


# ---- equivariance -----------------------------------------------------------------------------------------


class _ToyFeatures(NamedTuple):
    fpn: list[torch.Tensor]
    x_feats: torch.Tensor


class _ToyModel(nn.Module):
    """K-Net protocol, exactly flip-equivariant: stride-8 average pooling and 1x1 maps, position-free kernels.

    With ``ramp`` a horizontal position ramp is added to the features, which breaks flip equivariance.
    """

    def __init__(self, *, ramp: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Conv2d(3, 4, 1)
        self.kernels = nn.Parameter(torch.randn(3, 4, generator=g))
        self.ramp = ramp

    def forward_features(self, images: torch.Tensor) -> _ToyFeatures:
        x = self.proj(F.avg_pool2d(images / 255, 8))
        if self.ramp:
            x = x + torch.linspace(0, 3, x.shape[-1])
        return _ToyFeatures(fpn=[x, F.avg_pool2d(x, 2)], x_feats=x)

    def forward_from_features(self, features: _ToyFeatures, kernel_offsets=None) -> dict:
        batch = features.x_feats.shape[0]
        kernels = self.kernels[None].expand(batch, -1, -1)
        masks = torch.einsum("bnd,bdhw->bnhw", kernels, features.x_feats)
        return {"pred_logits": torch.zeros(batch, 3, 1), "pred_masks": masks, "pred_kernels": kernels,
                "aux_outputs": [], "init_masks": masks, "init_kernels": kernels}  # fmt: skip

    def forward(self, images: torch.Tensor) -> dict:
        return self.forward_from_features(self.forward_features(images))


class _NoLosses(nn.Module):
    def forward(self, outputs, targets):
        return {}


def _equivariance(model: nn.Module, images: torch.Tensor, transform: str) -> dict:
    objective = IUQObjective(
        criterion=_NoLosses(), equivariance_mask_weight=1.0, equivariance_target="consistency",
        equivariance_feature_weight=1.0, transform=transform, rescale_range=(0.5, 0.5),
    )  # fmt: skip
    return objective(model, images, [{"image_id": b} for b in range(images.shape[0])])


def test_consistency_form_is_zero_for_an_equivariant_model() -> None:
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    losses = _equivariance(_ToyModel(), images, "flip")
    assert losses["loss_equi_mask"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_equi_feat"].item() == pytest.approx(0.0, abs=1e-6)
    # Rescaling: a model is equivariant to it on images of one colour each (constant features).
    flat = torch.tensor([30.0, 120.0]).view(2, 1, 1, 1).expand(2, 3, 64, 128).contiguous()
    for transform in ("rescale", "flip_rescale"):
        losses = _equivariance(_ToyModel(), flat, transform)
        assert losses["loss_equi_mask"].item() == pytest.approx(0.0, abs=1e-6), transform
        assert losses["loss_equi_feat"].item() == pytest.approx(0.0, abs=1e-6), transform


def test_consistency_form_sees_a_position_dependent_model() -> None:
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    losses = _equivariance(_ToyModel(ramp=True), images, "flip")
    assert losses["loss_equi_mask"].item() > 1e-3 and losses["loss_equi_feat"].item() > 1e-3
    sum(losses.values()).backward()


def test_equivariance_terms_by_hand() -> None:
    # Masks: a = sigmoid(0) = [.5, .5]; c = flip([1, 0]) = [0, 1]: ((.5)^2 + (.5)^2) / (.5 + 1 + 1) = 0.2.
    flip = Transform(flip=True, size=(32, 32))
    transformed = torch.zeros(1, 1, 1, 2)
    original = torch.tensor([BIG, -BIG]).view(1, 1, 1, 2)
    assert mask_consistency_loss(transformed, original, flip).item() == pytest.approx(0.2, abs=1e-6)
    # Features: orthogonal vectors at the only pixel: 1 - cos = 1; equal ones: 0; the mean over two levels.
    a, b = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    assert feature_equivariance_loss([a, a], [b, a * 3], flip).item() == pytest.approx(0.5, abs=1e-6)


def _knet_criterion() -> KNetCriterion:
    return KNetCriterion(num_classes=1, matcher=HungarianMatcher())  # BCE 1, dice 4 at stage 0 and the last


def _block_target(height: int, width: int, rows: slice, cols: slice) -> dict:
    masks = torch.zeros(1, height, width, dtype=torch.bool)
    masks[0, rows, cols] = True
    box = [cols.start, rows.start, cols.stop, rows.stop]
    return {"labels": torch.tensor([0]), "masks": masks, "boxes": torch.tensor([box], dtype=torch.float32),
            "image_id": 1, "orig_size": (height, width), "image_size": (height, width)}  # fmt: skip


def _stride8_outputs(masks: torch.Tensor) -> dict:
    """K-Net outputs of one stage after the initial masks, both = ``masks`` [B, N, h, w] logits at stride 8."""
    return {"init_masks": masks, "aux_outputs": [], "pred_logits": torch.zeros(*masks.shape[:2], 1),
            "pred_masks": masks}  # fmt: skip


def test_ground_truth_form_by_hand_and_against_the_consistency_form() -> None:
    # A 64x64 image, one instance in rows 0:32, cols 0:16; T = flip, so T(GT) is rows 0:32, cols 48:64.
    flip = Transform(flip=True, size=(64, 64))
    [moved] = transform_targets([_block_target(64, 64, slice(0, 32), slice(0, 16))], flip)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[:32, 48:] = True
    assert torch.equal(moved["masks"][0], expected) and moved["boxes"].tolist() == [[48.0, 0.0, 64.0, 32.0]]
    # Query 1 is matched to the instance at both stages (the original view's matching).
    matches = [[(torch.tensor([1]), torch.tensor([0]))]] * 2
    exact = torch.full((1, 2, 8, 8), -BIG)
    exact[0, 1, :4, 6:] = BIG  # T(GT) on the stride-8 grid
    loss = ground_truth_equivariance_loss(_knet_criterion(), _stride8_outputs(exact), [moved], matches)
    assert loss.item() == pytest.approx(0.0, abs=1e-3)
    # Empty masks: at the loss stride 4 (16x16) the target covers 32 of 256 pixels; BCE = 30 * 32 / 256 = 3.75
    # and dice = 1 per stage, so (1 * 3.75 + 4 * 1) at stage 0 and again at stage 1.
    empty = torch.full((1, 2, 8, 8), -BIG)
    loss = ground_truth_equivariance_loss(_knet_criterion(), _stride8_outputs(empty), [moved], matches)
    assert loss.item() == pytest.approx(2 * (3.75 + 4.0), rel=1e-4)
    # The untransformed ground truth is no better than empty: its mask misses T(GT) entirely.
    unflipped = torch.full((1, 2, 8, 8), -BIG)
    unflipped[0, 1, :4, :2] = BIG
    loss = ground_truth_equivariance_loss(_knet_criterion(), _stride8_outputs(unflipped), [moved], matches)
    assert loss.item() > 2 * (3.75 + 4.0)
    # The consistency form scores two empty views 0: the bug of comparing predictions with predictions.
    assert mask_consistency_loss(empty, empty, flip).item() == 0.0


def test_transform_targets_rescale_and_flip() -> None:
    target = _block_target(64, 64, slice(0, 32), slice(0, 16))
    target["image_size"] = (60, 50)
    [half] = transform_targets([target], Transform(flip=False, size=(32, 32)))
    assert half["masks"].shape == (1, 32, 32) and half["masks"].dtype == torch.bool
    assert half["masks"][0].nonzero().amin(0).tolist() == [0, 0] and half["masks"][0].sum().item() == 16 * 8
    assert half["boxes"].tolist() == [[0.0, 0.0, 8.0, 16.0]] and half["image_size"] == (30, 25)
    [both] = transform_targets([target], Transform(flip=True, size=(32, 32)))
    assert torch.equal(both["masks"], half["masks"].flip(-1)) and both["boxes"].tolist() == [[24.0, 0.0, 32.0, 16.0]]
    assert both["labels"].tolist() == [0] and both["image_id"] == 1
    assert target["masks"].shape == (1, 64, 64)  # the input is not modified
    [none] = transform_targets([{**target, "labels": torch.zeros(0), "masks": torch.zeros(0, 64, 64, dtype=torch.bool),
                                 "boxes": torch.zeros(0, 4)}], Transform(flip=True, size=(32, 32)))  # fmt: skip
    assert none["masks"].shape == (0, 32, 32) and none["boxes"].shape == (0, 4)


class _Recording(_ToyModel):
    """The toy model (not equivariant: with the ramp), keeping the outputs of each call with their mask gradients."""

    def __init__(self) -> None:
        super().__init__(ramp=True)
        self.calls: list[dict] = []

    def forward_from_features(self, features: _ToyFeatures, kernel_offsets=None) -> dict:
        outputs = super().forward_from_features(features)
        outputs["pred_masks"].retain_grad()
        self.calls.append(outputs)
        return outputs


def test_ground_truth_form_trains_through_the_transformed_view_only() -> None:
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    targets = [_block_target(64, 96, slice(8, 40), slice(0, 24)), _block_target(64, 96, slice(0, 16), slice(40, 96))]
    # The second image has no instance: it is supervised by nothing and must not break the term.
    targets[1] = {**targets[1], "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, 64, 96, dtype=torch.bool), "boxes": torch.zeros(0, 4)}  # fmt: skip
    for form, original_gets_gradient in (("ground_truth", False), ("consistency", True)):
        model = _Recording()
        objective = IUQObjective(criterion=_knet_criterion(), equivariance_mask_weight=1.0, equivariance_target=form)
        losses = objective(model, images, targets)
        assert losses["loss_equi_mask"].item() > 0.01, form
        losses["loss_equi_mask"].backward()
        original, transformed = model.calls
        assert (original["pred_masks"].grad is not None) == original_gets_gradient, form
        assert transformed["pred_masks"].grad.abs().sum().item() > 0, form
        assert model.kernels.grad.abs().sum().item() > 0, form
    with pytest.raises(ValueError, match="SetCriterion"):
        IUQObjective(criterion=_NoLosses(), equivariance_mask_weight=1.0)


def test_ground_truth_form_falls_when_a_tiny_knet_is_trained() -> None:
    torch.manual_seed(0)
    model = _trainable(_tiny_knet_config("iuq.equivariance_mask_weight=1.0"))
    assert model.objective.equivariance_target == "ground_truth"
    images, targets = _images_and_targets([1, 2], seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(10):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append(losses["loss_equi_mask"].item())
    assert history[-1] < 0.7 * history[0]


def test_memory_stores_instance_balanced_weights_of_the_targets() -> None:
    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64) * 255
    target = _block_target(64, 64, slice(0, 32), slice(0, 32))  # the top-left quarter
    for balance, instance_cell, background_cell in (("instance", 0.5 / 16, 0.5 / 48), ("pixel", 1 / 64, 1 / 64)):
        model = _trainable(_tiny_knet_config("iuq.inter_scene_weight=1.0", "iuq.memory_resolution=8",
                                             f"iuq.inter_scene_balance={balance}"))  # fmt: skip
        model(images, [target])
        _, ids, weights = model.objective.memory.read(device=torch.device("cpu"))
        # x_feats are at stride 8 (8x8), the memory grid too: the instance is exactly the top-left 4x4 cells.
        assert ids == [1] and weights.shape == (1, 8, 8)
        torch.testing.assert_close(weights[0, :4, :4], torch.full((4, 4), instance_cell))
        torch.testing.assert_close(weights[0, 4:], torch.full((4, 8), background_cell))


def test_sample_transform_keeps_inputs_valid() -> None:
    torch.manual_seed(0)
    for _ in range(20):
        t = sample_transform("flip_rescale", (64, 96), (0.3, 1.5))
        assert t.flip and all(side % 32 == 0 and side >= 32 for side in t.size)
    assert sample_transform("flip", (64, 96), (0.5, 1.0)) == Transform(flip=True, size=(64, 96))
    assert not sample_transform("rescale", (64, 96), (0.5, 0.5)).flip
    assert sample_transform("rescale", (64, 96), (0.5, 0.5)).size == (32, 64)
    maps = torch.arange(8.0).view(1, 1, 2, 4)
    assert torch.equal(apply_transform(maps, Transform(flip=True, size=(2, 4))), maps.flip(-1))
    with pytest.raises(ValueError, match="transform"):
        sample_transform("rotate", (64, 64), (0.5, 1.0))


# ---- the objective in build_objective, training and checkpoints -----------------------------------------------------

FAMILIES = {
    "knet": ("knet_tiny_synthetic.yaml", ["iuq.inter_scene_weight=0.3", "iuq.equivariance_mask_weight=1.0",
                                          "iuq.equivariance_feature_weight=1.0"]),
    "mask2former": ("mask2former_tiny_synthetic.yaml", ["iuq.inter_scene_weight=0.3",
                                                        "iuq.equivariance_mask_weight=1.0", "model.encoder_layers=1"]),
    "queryinst": ("queryinst_tiny_synthetic.yaml", ["iuq.equivariance_mask_weight=1.0",
                                                    "iuq.equivariance_feature_weight=1.0"]),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains_with_the_iuq_losses(family: str) -> None:
    config, extra = FAMILIES[family]
    cfg = load_config(
        CONFIGS / "demo" / config,
        ["model.num_classes=2", "model.num_kernels=4", "model.feat_channels=32", "model.num_stages=2",
         "iuq.equivariance_transform=flip_rescale", *extra],
    )  # fmt: skip
    torch.manual_seed(0)
    model = _trainable(cfg)
    plain = build_model(load_config(CONFIGS / "demo" / config, [
        "model.num_classes=2", "model.num_kernels=4", "model.feat_channels=32", "model.num_stages=2",
        *[e for e in extra if e.startswith("model.")]]))  # fmt: skip
    assert isinstance(model.objective, IUQObjective)
    assert list(model.model.state_dict()) == list(plain.state_dict()) and not model.objective.state_dict()
    for ids, seed in (([1, 2], 0), ([3, 4], 1)):
        images, targets = _images_and_targets(ids, seed)
        if ids == [3, 4]:  # an image without instances in the batch
            targets[1] = {**targets[1], "labels": torch.zeros(0, dtype=torch.int64),
                          "masks": torch.zeros(0, 64, 64, dtype=torch.bool), "boxes": torch.zeros(0, 4)}  # fmt: skip
        losses = model(images, targets)
        assert "loss_equi_mask" in losses and all(torch.isfinite(v) for v in losses.values())
        assert losses["loss_equi_mask"].item() > 0  # the ground-truth form: untrained masks are far from T(GT)
        sum(losses.values()).backward()
    assert ("loss_inter_scene" in losses) == ("iuq.inter_scene_weight=0.3" in extra)
    assert ("loss_equi_feat" in losses) == ("iuq.equivariance_feature_weight=1.0" in extra)
    assert model.model.backbone.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        plain.load_state_dict(model.model.state_dict())
        plain.eval()
        torch.testing.assert_close(model.model(images)["pred_masks"], plain(images)["pred_masks"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.name=maskrcnn", "iuq.equivariance_mask_weight=1"], "query-based"),
        (["model.name=queryinst", "iuq.inter_scene_weight=1"], "per-pixel mask features"),
        (["iuq.inter_scene_weight=-1"], "iuq.inter_scene_weight"),
        (["iuq.equivariance_mask_weight=1", "iuq.equivariance_transform=rotate"], "iuq.equivariance_transform"),
        (["iuq.equivariance_mask_weight=1", "iuq.equivariance_target=predictions"], "iuq.equivariance_target"),
        (["iuq.inter_scene_weight=1", "iuq.inter_scene_balance=image"], "iuq.inter_scene_balance"),
        (["iuq.equivariance_mask_weight=1", "iuq.rescale_range=[1.0, 0.5]"], "iuq.rescale_range"),
        (["iuq.inter_scene_weight=1", "iuq.memory_size=0"], "iuq.memory_size"),
        (["iuq.inter_scene_weight=1", "pretrain.enabled=true"], "fine-tuning options"),
    ],
)
def test_bad_iuq_settings_are_named(overrides: list[str], match: str) -> None:
    cfg = load_config(None, ["model.num_classes=2", "model.depth=18", "model.num_kernels=4", *overrides])
    with pytest.raises(ConfigError, match=match):
        _trainable(cfg)


def test_iuq_checkpoints_load_both_ways(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = _tiny_knet_config("iuq.equivariance_mask_weight=1.0")
    model = _trainable(cfg)
    plain = build_model(_tiny_knet_config())
    save_checkpoint(tmp_path / "iuq", model=model.model, objective=model.objective, config=cfg, meta={})
    ckpt = load_checkpoint(tmp_path / "iuq")
    plain.load_state_dict(ckpt.model_state)  # strict: the IUQ checkpoint's model is a plain K-Net
    assert ckpt.objective_state == {}  # the memory is not state
    fresh = _trainable(cfg)
    report = load_init_weights(fresh.model, plain.state_dict())  # plain -> IUQ fine-tuning
    assert not report.missing and not report.skipped and not report.reinitialised
    # An SP pre-training checkpoint of the single-file format -> IUQ fine-tuning.
    old = {"model." + k: v for k, v in plain.state_dict().items()}
    old["projection.weight"] = torch.zeros(1)
    model_state, objective_state = split_legacy_state(old)
    report = load_init_weights(fresh.model, model_state)
    assert not report.missing and not report.skipped and list(objective_state) == ["projection.weight"]


def test_fit_with_iuq_then_evaluate_and_export_like_a_plain_checkpoint(tmp_path: Path) -> None:
    from export.exporter.onnx_export import export_checkpoint
    from sp_ray.evaluation.coco_eval import evaluate_checkpoint

    data = write_synthetic_dataset(tmp_path / "data", num_images=4, image_size=64, seed=0)
    cfg = _tiny_knet_config(
        f"data.train_annotations={data['train']}", f"data.train_images={data['images']}", "data.max_size=64",
        "data.short_size=64", "model.num_classes=0", "train.epochs=1", "train.batch_size=2",
        "iuq.inter_scene_weight=0.3", "iuq.equivariance_mask_weight=1.0", "iuq.equivariance_feature_weight=0.5",
    )  # fmt: skip
    final = fit(cfg, tmp_path / "work")
    metrics = (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()
    assert '"loss_inter_scene"' in metrics[-1] and '"loss_equi_feat"' in metrics[-1]
    ap, results = evaluate_checkpoint(str(final), annotations=str(data["val"]), images=str(data["images"]))
    assert set(ap) == {"segm", "bbox", "skipped"} and ap["skipped"] == {"images": 0, "annotations": 0}
    result = export_checkpoint(final, tmp_path / "model.onnx", input_size=(64, 64), parity_count=2)
    assert result.parity.passed and result.path.is_file()
