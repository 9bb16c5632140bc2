"""Mask2Former: its output conventions, attention pieces, matcher and loss values, over-fitting; the checks of
every family (shapes, batched = single, no targets, NaN input, export) are in test_families.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sp_ray.models.mask2former import (
    MASK_STRIDE,
    Mask2Former,
    MultiHeadAttention,
    MultiScaleDeformableAttention,
    build_mask2former,
    sigmoid_compatible_logits,
)
from sp_ray.models.postprocess import postprocess
from sp_ray.objectives.mask2former_criterion import (
    Mask2FormerCriterion,
    Mask2FormerMatcher,
    naive_dice_cost,
    naive_dice_loss,
    pairwise_bce_cost,
    point_sample,
    sample_uncertain_points,
    softmax_class_cost,
)

B, H, W = 2, 64, 96
N, C, D, L = 8, 3, 32, 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny(**overrides) -> Mask2Former:
    torch.manual_seed(0)
    kwargs = dict(
        num_classes=C, depth=18, num_queries=N, num_layers=L, feat_channels=D, num_heads=4, ffn_channels=64,
        encoder_layers=1, encoder_ffn_channels=64, deform_points=2,
    )  # fmt: skip
    kwargs.update(overrides)
    return build_mask2former(**kwargs)


@pytest.fixture(scope="module")
def model() -> Mask2Former:
    return _tiny()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(B, 3, H, W) * 255


def _target(labels: list[int], masks: torch.Tensor) -> dict:
    return {"labels": torch.tensor(labels, dtype=torch.int64), "masks": masks, "boxes": torch.zeros(len(labels), 4),
            "image_id": 0, "orig_size": tuple(masks.shape[-2:]), "image_size": tuple(masks.shape[-2:])}


def _rect(y0: int, y1: int, x0: int, x1: int, size: tuple[int, int] = (H, W)) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize("train", [True, False])
def test_class_logits_have_a_no_object_column_and_k0_is_the_query_features(model, images, train: bool) -> None:
    """What Mask2Former adds to the outputs of every family (test_families.py): softmax class logits with a
    "no object" column at every layer, and K^0 the learnable query features, the same for every image."""
    model.train(train)
    with torch.no_grad():
        out = model(images)
    assert MASK_STRIDE == 4
    assert out["pred_class_logits"].shape == out["init_class_logits"].shape == (B, N, C + 1)
    for stage in out["aux_outputs"]:
        assert stage["pred_class_logits"].shape == (B, N, C + 1)
    torch.testing.assert_close(out["init_kernels"], model.query_feat.weight[None].expand(B, -1, -1))


def test_pred_logits_give_the_softmax_scores_through_a_sigmoid(model, images) -> None:
    model.eval()
    with torch.no_grad():
        out = model(images)
    for stage in [*out["aux_outputs"], out]:
        probs = stage["pred_class_logits"].softmax(-1)[..., :C]
        torch.testing.assert_close(stage["pred_logits"].sigmoid(), probs, rtol=1e-5, atol=1e-6)
    # Exact and finite where a class takes (almost) all the mass and where it takes none.
    z = torch.tensor([[[60.0, 0.0, -60.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]])
    s = sigmoid_compatible_logits(z)
    expected = z[..., :3] - torch.stack([torch.logsumexp(z[..., [j for j in range(4) if j != c]], -1)
                                         for c in range(3)], -1)  # fmt: skip
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, expected)
    assert s[0, 0, 0].item() == pytest.approx(60 - math.log(2), abs=1e-4)
    assert s[1, 0, 1].item() == pytest.approx(-math.log(3), abs=1e-6)


def test_kernel_offsets_act_as_shifted_query_features(images) -> None:
    """SP adds its prompts to the content queries before the first prediction: an offset equals a shift of
    query_feat, and K^0 (init_kernels) stays the unprompted value."""
    model = _tiny().eval()
    delta = torch.randn(N, D)
    with torch.no_grad():
        plain = model(images)
        zero = model(images, kernel_offsets=torch.zeros(B, N, D))
        prompted = model(images, kernel_offsets=delta[None].expand(B, -1, -1))
    torch.testing.assert_close(zero["pred_masks"], plain["pred_masks"])
    torch.testing.assert_close(prompted["init_kernels"], plain["init_kernels"])
    with torch.no_grad():
        model.query_feat.weight += delta
        shifted = model(images)
    for key in ("init_masks", "pred_masks", "pred_logits", "pred_kernels"):
        torch.testing.assert_close(prompted[key], shifted[key], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(prompted["init_masks"], plain["init_masks"], atol=1e-3)
    with pytest.raises(ValueError, match="kernel_offsets"):
        model(images, kernel_offsets=torch.zeros(B, N + 1, D))


def test_masked_attention_ignores_keys_outside_the_mask() -> None:
    torch.manual_seed(0)
    attention = MultiHeadAttention(channels=D, num_heads=4)
    query, key, value = torch.randn(1, 2, D), torch.randn(1, 6, D), torch.randn(1, 6, D)
    mask = torch.tensor([[[False, False, True, True, True, True], [True, True, True, True, True, False]]])
    out = attention(query, key, value, mask)
    key2, value2 = key.clone(), value.clone()
    key2[0, 2:5] += 5.0
    value2[0, 2:5] -= 3.0
    torch.testing.assert_close(attention(query, key2, value2, mask), out)
    # A query allowed a single key gets that key's projected value.
    expected = attention.out_proj(attention.v_proj(value[0, 5]))
    torch.testing.assert_close(out[0, 1], expected)


def test_deformable_attention_samples_bilinearly_at_the_offsets() -> None:
    """One level, one point, identity projections, zero learned offsets: the output at a reference point is
    the feature bilinearly sampled there (a cell centre reads the cell; a point between two cells their mean);
    a constant offset of one cell reads the neighbour."""
    attention = MultiScaleDeformableAttention(channels=D, num_heads=4, num_levels=1, num_points=1)
    with torch.no_grad():
        for proj in (attention.value_proj, attention.output_proj):
            proj.weight.copy_(torch.eye(D))
            proj.bias.zero_()
        attention.sampling_offsets.bias.zero_()
    torch.manual_seed(0)
    value = torch.randn(1, D, 4, 5)
    refs = torch.tensor([[[(2 + 0.5) / 5, (1 + 0.5) / 4], [(2 + 1.0) / 5, (1 + 0.5) / 4]]])  # cell (1, 2), edge
    out = attention(torch.randn(1, 2, D), refs, [value])
    torch.testing.assert_close(out[0, 0], value[0, :, 1, 2])
    torch.testing.assert_close(out[0, 1], (value[0, :, 1, 2] + value[0, :, 1, 3]) / 2)
    with torch.no_grad():
        attention.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]).repeat(4))  # one cell to the right
    out = attention(torch.randn(1, 2, D), refs, [value])
    torch.testing.assert_close(out[0, 0], value[0, :, 1, 3])


def test_bad_inputs_and_hyper_parameters_are_rejected(model) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 60, 96))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.zeros(3, 64, 96))
    with pytest.raises(ValueError, match="multiple of 32"):
        _tiny(feat_channels=48)
    with pytest.raises(ValueError, match="num_heads"):
        _tiny(num_heads=5)
    with pytest.raises(ValueError, match="num_queries"):
        _tiny(num_queries=0)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        Mask2FormerCriterion(num_classes=C, matcher=Mask2FormerMatcher(), importance_sample_ratio=1.5)


def test_every_trainable_parameter_gets_a_gradient(images) -> None:
    model = _tiny(frozen_stages=1).train()
    criterion = Mask2FormerCriterion(num_classes=C, matcher=Mask2FormerMatcher(num_points=64), num_points=64)
    masks = torch.stack([_rect(8, 40, 8, 48), _rect(30, 60, 50, 90)])
    losses = criterion(model(images), [_target([0, 2], masks), _target([1], masks[:1])])
    assert set(losses) == {f"loss_{n}_s{i}" for n in ("cls", "mask", "dice") for i in range(L + 1)}
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_point_sample_reads_cell_centres_exactly() -> None:
    maps = torch.arange(12.0).view(1, 1, 3, 4)
    coords = torch.tensor([[[(0 + 0.5) / 4, (0 + 0.5) / 3], [(3 + 0.5) / 4, (2 + 0.5) / 3], [0.5, 0.5]]])
    values = point_sample(maps, coords)[0, 0]
    assert values.tolist() == pytest.approx([0.0, 11.0, (5 + 6) / 2], abs=1e-5)
    # Beyond the outer cell centres the border value holds (no zero padding).
    assert point_sample(maps, torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))[0, 0].tolist() == pytest.approx([0, 11])


def test_uncertain_points_concentrate_where_the_logits_are_near_zero() -> None:
    torch.manual_seed(0)
    # Logits -16 .. 16 along x: uncertainty -|logit| is highest on the column x = 0.5.
    logits = torch.linspace(-16, 16, 64).view(1, 1, 1, 64).expand(2, 1, 8, 64).contiguous()
    coords = sample_uncertain_points(logits, num_points=300, oversample_ratio=3.0, importance_sample_ratio=1.0)
    assert coords.shape == (2, 300, 2)
    # The 300 most uncertain of 900 uniform points lie within about 1/6 of the boundary.
    assert (coords[..., 0] - 0.5).abs().max() < 0.22
    mixed = sample_uncertain_points(logits, num_points=300, oversample_ratio=3.0, importance_sample_ratio=0.5)
    near = ((mixed[..., 0] - 0.5).abs() < 0.22).float().mean()
    assert 0.5 < near < 0.95  # half importance-sampled, half uniform


def test_mask_costs_and_losses_agree_with_their_definitions() -> None:
    torch.manual_seed(0)
    x, t = torch.randn(3, 50), (torch.rand(2, 50) > 0.5).float()
    bce = pairwise_bce_cost(x, t)
    for n in range(3):
        for k in range(2):
            assert bce[n, k].item() == pytest.approx(F.binary_cross_entropy_with_logits(x[n], t[k]).item(), rel=1e-5)
            assert naive_dice_cost(x, t)[n, k].item() == pytest.approx(
                naive_dice_loss(x[n : n + 1], t[k : k + 1]).item(), rel=1e-5
            )
    # 1 - (2 sum(p t) + 1) / (sum p + sum t + 1): exact prediction 0; all-background prediction 1 - 1 / (3 + 1).
    target = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert naive_dice_loss(target * 60 - 30, target).item() == pytest.approx(0.0, abs=1e-6)
    assert naive_dice_loss(torch.full((1, 4), -60.0), target).item() == pytest.approx(0.75, abs=1e-6)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    cost = softmax_class_cost(logits, torch.tensor([1, 0]))
    torch.testing.assert_close(cost, -logits.softmax(-1)[:, [1, 0]])


def test_matcher_pairs_queries_with_the_targets_they_predict() -> None:
    torch.manual_seed(0)
    size = (32, 32)
    targets_masks = torch.stack([_rect(0, 16, 0, 16, size), _rect(16, 32, 8, 32, size)])
    small = F.interpolate(targets_masks[None].float(), scale_factor=1 / 4)[0]  # stride-4 predictions
    pred_masks = torch.stack([small[1], torch.zeros(8, 8), small[0]])[None] * 40 - 20  # (1, 3, 8, 8)
    class_logits = torch.tensor([[[0.0, 4.0, 0.0], [0.0, 0.0, 4.0], [4.0, 0.0, 0.0]]])  # C = 2
    matcher = Mask2FormerMatcher(num_points=400)
    (pred_idx, tgt_idx), = matcher(class_logits, pred_masks, [{"labels": torch.tensor([0, 1]), "masks": targets_masks}])
    assert pred_idx.tolist() == [0, 2] and tgt_idx.tolist() == [1, 0]
    # No targets; more targets than queries (every query matched once).
    (empty_p, empty_t), = matcher(class_logits, pred_masks, [{"labels": torch.zeros(0, dtype=torch.int64),
                                                              "masks": torch.zeros(0, *size, dtype=torch.bool)}])
    assert empty_p.numel() == 0 and empty_t.numel() == 0
    many = torch.stack([targets_masks[0], targets_masks[1], _rect(20, 30, 0, 6, size), _rect(0, 4, 20, 30, size)])
    (p, t), = matcher(class_logits, pred_masks, [{"labels": torch.tensor([0, 1, 0, 1]), "masks": many}])
    assert sorted(p.tolist()) == [0, 1, 2] and len(set(t.tolist())) == 3


def _constant_outputs(class_logits: torch.Tensor, masks: torch.Tensor, layers: int) -> dict:
    """Outputs whose every layer predicts ``class_logits`` [B, N, C + 1] and ``masks`` [B, N, h, w]."""
    stage = {"pred_logits": sigmoid_compatible_logits(class_logits), "pred_class_logits": class_logits,
             "pred_masks": masks, "pred_kernels": torch.zeros(*masks.shape[:2], 4)}  # fmt: skip
    return {**stage, "aux_outputs": [dict(stage) for _ in range(layers - 1)], "init_masks": masks,
            "init_kernels": stage["pred_kernels"], "init_class_logits": class_logits}  # fmt: skip


def test_criterion_values_on_constructed_predictions() -> None:
    torch.manual_seed(0)
    masks = torch.stack([_rect(0, 32, 0, 32), _rect(32, 64, 48, 96)])  # (2, 64, 96)
    small = F.interpolate(masks[None].float(), scale_factor=1 / MASK_STRIDE)[0]
    pred = torch.stack([small[1], small[0], torch.zeros_like(small[0])])[None] * 60 - 30  # the right shapes
    criterion = Mask2FormerCriterion(num_classes=2, matcher=Mask2FormerMatcher(num_points=256), num_points=256)
    # Uniform class logits: CE = log(C + 1) for every query whatever the class weights.
    losses, matches = criterion(_constant_outputs(torch.zeros(1, 3, 3), pred, layers=2),
                                [_target([0, 1], masks)], return_matches=True)  # fmt: skip
    assert len(matches) == 3 and all(m[0][0].tolist() == [0, 1] and m[0][1].tolist() == [1, 0] for m in matches)
    for i in range(3):
        assert losses[f"loss_cls_s{i}"].item() == pytest.approx(2.0 * math.log(3), rel=1e-5)
    # Matched queries: true class; the third: "no object", weighted 0.1 in the weighted mean.
    logits = torch.tensor([[[0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]]])
    losses = criterion(_constant_outputs(logits, pred, layers=1), [_target([0, 1], masks)])
    ce = F.cross_entropy(logits[0], torch.tensor([1, 0, 2]), reduction="none")
    expected = (ce[0] + ce[1] + 0.1 * ce[2]) / 2.1
    assert losses["loss_cls_s1"].item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    # All-background masks cost far more than the right shapes (importance-sampled near their edges).
    empty = criterion(_constant_outputs(logits, torch.full_like(pred, -30.0), layers=1), [_target([0, 1], masks)])
    assert empty["loss_mask_s1"] > 5 * losses["loss_mask_s1"] and 4.5 < empty["loss_dice_s1"].item() <= 5.0
    assert empty["loss_dice_s1"] > 5 * losses["loss_dice_s1"]
    # Constant logits a against a full-image target read a at every point: BCE softplus(-a) and dice
    # 1 - (2 P s + 1) / (P s + P + 1), s = sigmoid(a), each weighted 5 and divided by the one target.
    a, points = 1.0, 256
    full = _target([0], torch.ones(1, H, W, dtype=torch.bool))
    losses = criterion(_constant_outputs(logits, torch.full_like(pred, a), layers=1), [full])
    s = 1 / (1 + math.exp(-a))
    assert losses["loss_mask_s1"].item() == pytest.approx(5 * math.log1p(math.exp(-a)), rel=1e-5)
    assert losses["loss_dice_s1"].item() == pytest.approx(5 * (1 - (2 * points * s + 1) / (points * s + points + 1)),
                                                          rel=1e-5)  # fmt: skip


def test_criterion_without_targets_trains_only_no_object() -> None:
    criterion = Mask2FormerCriterion(num_classes=2, matcher=Mask2FormerMatcher(num_points=64), num_points=64)
    logits = torch.zeros(1, 3, 3, requires_grad=True)
    pred = torch.zeros(1, 3, 16, 24, requires_grad=True)
    empty = _target([], torch.zeros(0, H, W, dtype=torch.bool))
    losses = criterion(_constant_outputs(logits, pred, layers=1), [empty])
    assert losses["loss_mask_s1"].item() == 0 and losses["loss_dice_s1"].item() == 0
    assert losses["loss_cls_s1"].item() == pytest.approx(2.0 * math.log(3), rel=1e-5)
    sum(losses.values()).backward()
    assert logits.grad[0, :, 2].lt(0).all()  # every query is pushed towards "no object"
    with pytest.raises(ValueError, match="padded input size"):
        criterion(_constant_outputs(logits, pred, layers=1), [_target([0], torch.zeros(1, 32, 32, dtype=torch.bool))])
    with pytest.raises(ValueError, match="labels must be in"):
        criterion(_constant_outputs(logits, pred, layers=1), [_target([5], torch.zeros(1, H, W, dtype=torch.bool))])


def test_tiny_mask2former_fits_two_images() -> None:
    colors = {0: (220.0, 40.0, 40.0), 1: (40.0, 40.0, 220.0)}
    layouts = [([_rect(8, 40, 8, 40), _rect(24, 56, 56, 88)], [0, 1]), ([_rect(16, 48, 40, 80)], [1])]
    images = torch.zeros(2, 3, H, W)
    targets = []
    for i, (masks, labels) in enumerate(layouts):
        for mask, label in zip(masks, labels, strict=True):
            images[i][:, mask] = torch.tensor(colors[label])[:, None]
        targets.append(_target(labels, torch.stack(masks)))
    model = _tiny(num_classes=2, frozen_stages=4)
    criterion = Mask2FormerCriterion(num_classes=2, matcher=Mask2FormerMatcher(num_points=256), num_points=256)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    model.train()
    history = []
    for _ in range(80):
        loss = sum(criterion(model(images), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < history[0] / 5

    model.eval()
    with torch.no_grad():
        results = postprocess(model(images), image_sizes=[(H, W)] * 2, orig_sizes=[(H, W)] * 2, k=4,
                              mask_stride=MASK_STRIDE)  # fmt: skip
    # Every object is found, with its class, as one of the top detections, and segmented almost exactly.
    for result, (masks, labels) in zip(results, layouts, strict=True):
        for mask, label in zip(masks, labels, strict=True):
            ious = [((m & mask).sum() / (m | mask).sum()).item() for m in result["masks"][: len(labels)]]
            best = max(range(len(ious)), key=ious.__getitem__)
            assert ious[best] > 0.9 and result["labels"][best].item() == label
