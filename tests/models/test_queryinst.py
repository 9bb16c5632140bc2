"""QueryInst: geometry helpers, forward shapes, matcher and loss values, over-fitting, export parity, SP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from sp_ray.checkpoint import init_from_checkpoint, load_checkpoint, save_checkpoint
from sp_ray.config import load_config
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.data.transforms import mask_boxes
from sp_ray.models import FAMILIES, build_model
from sp_ray.models.queryinst import (
    MASK_SIZE,
    MASK_STRIDE,
    OUTSIDE_LOGIT,
    QueryInst,
    build_queryinst,
    decode_boxes,
    multilevel_roi_align,
    paste_roi_masks,
)
from sp_ray.objectives import Trainable
from sp_ray.objectives.queryinst_criterion import BoxHungarianMatcher, QueryInstCriterion, roi_mask_targets
from sp_ray.pretrain.sp_objective import SPObjective, build_sp_objective
from sp_ray.train.loop import fit

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY_CONFIG = CONFIGS / "demo" / "queryinst_tiny_synthetic.yaml"
B, H, W = 2, 64, 96
N, C, D, S = 8, 3, 32, 2
COLORS = {0: (220.0, 40.0, 40.0), 1: (40.0, 40.0, 220.0)}
# The tiny model of the config-driven tests (checkpoints, export, SP, CLI).
TINY = ["data.max_size=64", "data.short_size=64", "data.flip_prob=0.0", "model.num_kernels=8",
        "model.feat_channels=32", "model.dynamic_channels=8", "model.ffn_channels=64", "model.num_heads=2",
        "model.num_stages=2", "train.batch_size=4", "train.warmup_iters=2", "train.lr=1e-3", "train.lr_steps=[100]"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny(**overrides) -> QueryInst:
    torch.manual_seed(0)
    kwargs = dict(
        num_classes=C, depth=18, num_queries=N, num_stages=S, feat_channels=D, dynamic_channels=8,
        ffn_channels=64, num_heads=4,
    )  # fmt: skip
    kwargs.update(overrides)
    return build_queryinst(**kwargs)


@pytest.fixture(scope="module")
def model() -> QueryInst:
    return _tiny()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(B, 3, H, W) * 255


def _target(labels: list[int], masks: torch.Tensor, size: tuple[int, int] = (H, W)) -> dict:
    return {
        "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks, "boxes": mask_boxes(masks),
        "image_id": 0, "orig_size": size, "image_size": size,
    }  # fmt: skip


def _rect(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


# --- geometry ---------------------------------------------------------------------------------------------


def test_decode_boxes_applies_scaled_deltas() -> None:
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    torch.testing.assert_close(decode_boxes(boxes, torch.zeros(1, 4)), boxes)
    # dx = 1 moves the centre by half a width (std 0.5); dh = log 2 doubles the height around the centre.
    out = decode_boxes(boxes, torch.tensor([[1.0, 0.0, 0.0, math.log(2.0)]]))
    torch.testing.assert_close(out, torch.tensor([[20.0, 0.0, 40.0, 80.0]]))
    # Huge log-size deltas are clamped (mmdet's max ratio 1000 / 16) rather than overflowing.
    assert torch.isfinite(decode_boxes(boxes, torch.tensor([[0.0, 0.0, 1e4, 1e4]]))).all()


def test_paste_puts_the_roi_mask_inside_its_box_and_the_outside_logit_elsewhere() -> None:
    box = torch.tensor([[[16.0, 8.0, 48.0, 40.0]]])  # (B, N, 4) = x 16..48, y 8..40
    left = torch.full((1, 1, MASK_SIZE, MASK_SIZE), -10.0)
    left[..., : MASK_SIZE // 2] = 10.0  # the left half of the box is foreground
    pasted = paste_roi_masks(left, box, size=(16, 24), stride=MASK_STRIDE)[0, 0]
    ys = (torch.arange(16) + 0.5) * MASK_STRIDE
    xs = (torch.arange(24) + 0.5) * MASK_STRIDE
    inside_y = (ys > 8) & (ys < 40)
    expected = inside_y[:, None] & ((xs > 16) & (xs < 32))[None]
    assert torch.equal(pasted > 0, expected)
    # Far from the box the logit is exactly the outside value.
    assert pasted[0, 0] == OUTSIDE_LOGIT and pasted[-1, -1] == OUTSIDE_LOGIT
    # Inside the box, away from its border and the half boundary, the values are the RoI's.
    assert torch.allclose(pasted[3:9, 5:7], torch.tensor(10.0))
    assert torch.allclose(pasted[3:9, 9:11], torch.tensor(-10.0))


def test_roi_align_reads_each_box_from_its_pyramid_level() -> None:
    # Level i is the constant i + 1, so the pooled value names the level a box was read from.
    feats = [torch.full((1, 4, 512 // s, 512 // s), float(i + 1)) for i, s in enumerate((4, 8, 16, 32))]
    sides = [40.0, 150.0, 300.0, 500.0]  # floor(log2(side / 56)) = 0 (clamped), 1, 2, 3
    boxes = torch.tensor([[[0.0, 0.0, s, s] for s in sides]])
    pooled = multilevel_roi_align(feats, boxes, output_size=7)
    assert pooled.shape == (4, 4, 7, 7)
    torch.testing.assert_close(pooled.mean(dim=(1, 2, 3)), torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_roi_mask_targets_cut_the_mask_at_the_box() -> None:
    masks = _rect(8, 40, 16, 48)[None]
    own = roi_mask_targets(masks, torch.tensor([[16.0, 8.0, 48.0, 40.0]]), torch.tensor([0]), size=MASK_SIZE)
    assert own.shape == (1, MASK_SIZE, MASK_SIZE) and bool((own == 1).all())
    wide = roi_mask_targets(masks, torch.tensor([[16.0, 8.0, 80.0, 40.0]]), torch.tensor([0]), size=MASK_SIZE)
    assert bool((wide[0, :, : MASK_SIZE // 2] == 1).all()) and bool((wide[0, :, MASK_SIZE // 2 :] == 0).all())


# --- model ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_outputs_carry_boxes_and_roi_masks_and_start_from_whole_image_proposals(model, images, train: bool) -> None:
    """What QueryInst adds to the outputs of every family (test_families.py): boxes and RoI masks per stage;
    the initial proposals cover the whole input, and K^0 are the learned proposal features."""
    model.train(train)
    with torch.no_grad():
        out = model(images)
    stage_keys = {"pred_logits", "pred_masks", "pred_kernels", "pred_boxes", "pred_roi_masks"}
    assert set(out) == stage_keys | {"aux_outputs", "init_masks", "init_kernels"}
    for stage in [*out["aux_outputs"], out]:
        assert stage_keys <= set(stage)
        assert stage["pred_boxes"].shape == (B, N, 4) and torch.isfinite(stage["pred_boxes"]).all()
        assert stage["pred_roi_masks"].shape == (B, N, MASK_SIZE, MASK_SIZE)
    assert bool((out["init_masks"] > 0).all())
    torch.testing.assert_close(out["init_kernels"][0], model.proposal_features)


def test_pasted_masks_are_the_roi_masks_at_the_predicted_boxes(model, images) -> None:
    model.eval()
    with torch.no_grad():
        out = model(images)
    expected = paste_roi_masks(out["pred_roi_masks"], out["pred_boxes"], size=(H // 4, W // 4))
    torch.testing.assert_close(out["pred_masks"], expected)


def test_kernel_offsets_are_added_to_the_proposal_features(model, images) -> None:
    model.eval()
    features = model.forward_features(images)
    offsets = torch.randn(B, N, D)
    with torch.no_grad():
        prompted = model.forward_from_features(features, offsets)
        plain = model.forward_from_features(features)
    torch.testing.assert_close(prompted["init_kernels"], plain["init_kernels"])
    assert not torch.allclose(prompted["pred_logits"], plain["pred_logits"])
    assert features.fpn[-1].shape[-2:] == (H // 32, W // 32)
    with pytest.raises(ValueError, match="kernel_offsets must have shape"):
        model.forward_from_features(features, torch.zeros(B, N + 1, D))


def test_bad_inputs_and_settings_are_named(model) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"images \[B, 3, H, W\]"):
        model(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="num_heads"):
        _tiny(num_heads=5)
    with pytest.raises(ValueError, match="num_stages"):
        _tiny(num_stages=0)


# --- matcher and criterion --------------------------------------------------------------------------------


def test_matcher_costs_are_the_l1_and_giou_of_the_boxes() -> None:
    matcher = BoxHungarianMatcher(cost_class=0.0, cost_l1=1.0, cost_giou=1.0)
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [20.0, 0.0, 30.0, 10.0]])
    scale = torch.tensor([100.0, 50.0, 100.0, 50.0])
    cost = matcher.cost_matrix(None, pred, torch.zeros(3, dtype=torch.int64), gt, scale)
    # L1 of normalised boxes: 0, 0.2, 0.4. GIoU: 1; 0 (touching); -1/3 (a gap of 10 in a 30-wide hull).
    torch.testing.assert_close(cost, torch.tensor([[0.0 - 1.0, 0.2 - 0.0, 0.4 + 1 / 3]]))


def test_matcher_pairs_each_prediction_with_its_own_box_and_handles_edge_cases() -> None:
    matcher = BoxHungarianMatcher()
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 10.0, 90.0, 60.0]])
    pred = torch.stack([gt[1] + 1, gt[0] - 1, torch.tensor([5.0, 5.0, 6.0, 6.0])])[None]  # (1, 3, 4)
    logits = torch.full((1, 3, C), -5.0)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": gt, "scale": torch.tensor([96.0, 64.0, 96.0, 64.0])}]
    ((rows, cols),) = matcher(logits, pred, targets)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4), "scale": targets[0]["scale"]}]
    ((rows, cols),) = matcher(logits, pred, empty)
    assert rows.numel() == cols.numel() == 0
    many = [{"labels": torch.zeros(5, dtype=torch.int64), "boxes": gt.repeat(3, 1)[:5], "scale": targets[0]["scale"]}]
    ((rows, cols),) = matcher(logits, pred, many)
    assert rows.tolist() == [0, 1, 2] and len(set(cols.tolist())) == 3
    with pytest.raises(ValueError, match="non-finite"):
        matcher(logits, pred * float("nan"), targets)


def _perfect_outputs(targets: list[dict], *, shift: float = 0.0) -> dict:
    """Outputs whose query k is target k of each image: exact boxes (x shifted by ``shift``), confident
    classes and RoI masks equal to the targets cut at those boxes; the other queries are confident background."""
    logits = torch.full((B, N, C), -30.0)
    boxes = torch.tensor([10.0, 10.0, 20.0, 20.0]).repeat(B, N, 1)
    roi = torch.full((B, N, MASK_SIZE, MASK_SIZE), -30.0)
    for b, t in enumerate(targets):
        k = len(t["labels"])
        logits[b, torch.arange(k), t["labels"]] = 30.0
        boxes[b, :k] = t["boxes"] + torch.tensor([shift, 0.0, shift, 0.0])
        cut = roi_mask_targets(t["masks"], boxes[b, :k], torch.arange(k), size=MASK_SIZE)
        roi[b, :k] = cut * 60.0 - 30.0
    stage = {"pred_logits": logits, "pred_boxes": boxes, "pred_roi_masks": roi,
             "pred_masks": paste_roi_masks(roi, boxes, size=(H // 4, W // 4)), "pred_kernels": torch.zeros(B, N, D)}
    init = {"init_masks": stage["pred_masks"], "init_kernels": stage["pred_kernels"]}
    return {**stage, "aux_outputs": [dict(stage)], **init}


def _two_targets() -> list[dict]:
    return [
        _target([0, 2], torch.stack([_rect(8, 40, 8, 40), _rect(24, 56, 56, 88)])),
        _target([1], _rect(16, 48, 40, 80)[None]),
    ]


def test_a_perfect_prediction_has_zero_loss_at_every_stage() -> None:
    criterion = QueryInstCriterion(num_classes=C, matcher=BoxHungarianMatcher())
    targets = _two_targets()
    losses, matches = criterion(_perfect_outputs(targets), targets, return_matches=True)
    assert set(losses) == {f"loss_{n}_s{i}" for i in (1, 2) for n in ("cls", "l1", "giou", "mask", "dice")}
    for name, value in losses.items():
        assert value.item() < 1e-4, name
    # [init, stage 1, stage 2]: the initial proposals have no loss and no pairs; each stage matches query k
    # to target k.
    assert len(matches) == S + 1 and all(p.numel() == 0 for p, _ in matches[0])
    for stage in matches[1:]:
        assert [p.tolist() for p, _ in stage] == [[0, 1], [0]] and [t.tolist() for _, t in stage] == [[0, 1], [0]]


def test_box_losses_have_their_paper_values_for_a_shifted_box() -> None:
    criterion = QueryInstCriterion(num_classes=C, matcher=BoxHungarianMatcher())
    targets = _two_targets()
    losses = criterion(_perfect_outputs(targets, shift=4.0), targets)
    # 3 matched boxes, each with x0 and x1 off by 4 px of a 96 px wide image: L1 = 5 * 3 * 8/96 / 3.
    torch.testing.assert_close(losses["loss_l1_s2"], torch.tensor(5 * 8 / 96))
    # GIoU of a box and its 4-px shift: IoU = (w-4)h / ((w+4)h), hull = union, per box; weight 2, mean.
    giou = [1 - (w - 4) / (w + 4) for w in (32.0, 32.0, 40.0)]
    torch.testing.assert_close(losses["loss_giou_s2"], torch.tensor(2 * sum(giou) / 3))


def test_criterion_handles_no_targets_and_more_targets_than_queries() -> None:
    model = _tiny()
    criterion = QueryInstCriterion(num_classes=C, matcher=BoxHungarianMatcher())
    images = torch.rand(B, 3, H, W) * 255
    crowded = torch.stack([_rect(4 * i, 4 * i + 8, 8 * i, 8 * i + 8) for i in range(N + 3)])
    targets = [_target([], torch.zeros(0, H, W, dtype=torch.bool)), _target([1] * (N + 3), crowded)]
    losses, matches = criterion(model(images), targets, return_matches=True)
    assert all(torch.isfinite(v) for v in losses.values())
    assert [len(p) for p, _ in matches[-1]] == [0, N]
    sum(losses.values()).backward()
    assert model.stages[0].mask_head.logits.weight.grad.abs().sum() > 0
    # Stage 1's box loss reaches the learned proposal boxes through the box decoding.
    assert model.proposal_boxes.grad.abs().sum() > 0
    only_empty = [_target([], torch.zeros(0, H, W, dtype=torch.bool))] * B
    losses = criterion(model(images), only_empty)
    assert losses["loss_l1_s2"] == 0 and losses["loss_cls_s2"] > 0


def test_criterion_rejects_bad_targets(model, images) -> None:
    criterion = QueryInstCriterion(num_classes=C, matcher=BoxHungarianMatcher())
    outputs = model(images)
    with pytest.raises(ValueError, match="padded input size"):
        criterion(outputs, [_target([0], _rect(0, 8, 0, 8)[None, :32])] * B)
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        criterion(outputs, [_target([C], _rect(0, 8, 0, 8)[None])] * B)
    with pytest.raises(ValueError, match="1 targets for a batch of 2"):
        criterion(outputs, [_target([0], _rect(0, 8, 0, 8)[None])])


# --- over-fitting -----------------------------------------------------------------------------------------


def test_tiny_queryinst_fits_two_images() -> None:
    layouts = [([_rect(8, 40, 8, 40), _rect(24, 56, 56, 88)], [0, 1]), ([_rect(16, 48, 40, 80)], [1])]
    images = torch.zeros(B, 3, H, W)
    targets = []
    for i, (masks, labels) in enumerate(layouts):
        for mask, label in zip(masks, labels, strict=True):
            images[i][:, mask] = torch.tensor(COLORS[label])[:, None]
        targets.append(_target(labels, torch.stack(masks)))
    model = _tiny(num_classes=2, frozen_stages=4)
    criterion = QueryInstCriterion(num_classes=2, matcher=BoxHungarianMatcher())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    model.train()
    history = []
    for _ in range(100):
        loss = sum(criterion(model(images), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < history[0] / 6, (history[0], history[-1])

    model.eval()
    with torch.no_grad():
        sizes = [(H, W)] * B
        results = FAMILIES["queryinst"].postprocess(model(images), image_sizes=sizes, orig_sizes=sizes, k=4)
    # Every target has a detection of its class that overlaps it well.
    for result, target in zip(results, targets, strict=True):
        for label, mask in zip(target["labels"], target["masks"], strict=True):
            ious = [((m & mask).sum() / (m | mask).sum()).item()
                    for m, lab in zip(result["masks"], result["labels"], strict=True) if lab == label]
            assert ious and max(ious) > 0.5


# --- training loop, export, SP pre-training, CLI ----------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_images=10, image_size=64, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic) -> Path:
    """A tiny QueryInst trained for a few epochs through the ordinary loop (with evaluation)."""
    cfg = load_config(TINY_CONFIG, [
        f"data.train_annotations={synthetic['train']}", f"data.train_images={synthetic['images']}",
        f"data.val_annotations={synthetic['val']}", f"data.val_images={synthetic['images']}", *TINY,
        "train.epochs=4",
    ])  # fmt: skip
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(cfg, tmp_path_factory.mktemp("queryinst_run"))
    finally:
        torch.set_num_threads(previous)


def test_training_loop_trains_and_evaluates(trained) -> None:
    lines = [json.loads(line) for line in (trained.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines[-1]["loss"] < lines[0]["loss"]
    assert {"segm_AP", "bbox_AP"} <= set(lines[-1])
    assert load_checkpoint(trained).config.model.name == "queryinst"


def test_export_passes_fp32_parity_and_the_runtime_decodes_it(trained, synthetic, tmp_path) -> None:
    from export.exporter.onnx_export import export_checkpoint
    from export.runtime import Segmenter

    result = export_checkpoint(trained, tmp_path / "queryinst.onnx", input_size=None, batch_size=None,
                               parity_images=synthetic["images"], parity_count=3)
    report = result.parity
    assert report.passed and report.detections > 0 and report.matched == report.detections
    assert result.info.family == "queryinst" and result.info.mask_stride == MASK_STRIDE
    segmenter = Segmenter(result.path, providers=["CPUExecutionProvider"], threads=1)
    image = np.zeros((50, 70, 3), np.uint8)
    image[10:30, 20:50] = (220, 40, 40)
    (found,) = segmenter.predict_batch([image], score_threshold=0.0)
    # Score 0 (an empty mask has maskness 0) is below any threshold; the rest of the top k come out.
    assert found.masks.shape[1:] == (50, 70) and 0 < len(found) <= result.info.topk
    assert found.boxes.shape == (len(found), 4) and (np.diff(found.scores) <= 0).all()


def _sp_config(tmp_path: Path, *extra: str):
    prompts = tmp_path / "prompts.npy"
    if not prompts.exists():
        rng = np.random.default_rng(0)
        queries = rng.standard_normal((50, 24)).astype(np.float32)
        np.save(prompts, queries / np.linalg.norm(queries, axis=1, keepdims=True))
    return load_config(CONFIGS / "demo" / "queryinst_tiny_sp_pretrain.yaml",
                       [f"pretrain.prompts={prompts}", *TINY, *extra])


def _sp_trainable(cfg) -> Trainable:
    model = build_model(cfg)
    return Trainable(model, build_sp_objective(cfg, model))


def test_sp_pretraining_forward_and_finetune_init(tmp_path) -> None:
    cfg = _sp_config(tmp_path)
    torch.manual_seed(0)
    pretrainer = _sp_trainable(cfg)
    assert isinstance(pretrainer.objective, SPObjective) and isinstance(pretrainer.model, QueryInst)
    images = torch.rand(B, 3, 64, 64) * 255
    pseudo = [_rect(8, 40, 8, 40)[:, :64], _rect(24, 56, 20, 60)[:, :64], _rect(30, 60, 0, 30)[:, :64]]
    targets = [_target([0, 0], torch.stack(pseudo[:2]), (64, 64)), _target([0], pseudo[2][None], (64, 64))]
    for t in targets:
        t["queries"] = torch.nn.functional.normalize(torch.randn(len(t["labels"]), 24), dim=1)
    losses = pretrainer(images, targets)
    stages = (1, 2)
    assert {f"loss_ker_s{i}" for i in stages} <= set(losses)
    assert {f"loss_{n}_s{i}" for i in stages for n in ("cls", "l1", "giou", "mask", "dice")} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_ker_s2"] > 0
    sum(losses.values()).backward()
    assert pretrainer.model.proposal_features.grad.abs().sum() > 0

    checkpoint = save_checkpoint(tmp_path / "pretrained", model=pretrainer.model, objective=pretrainer.objective,
                                 config=cfg, meta={"epoch": 1})
    finetune_cfg = _sp_config(tmp_path, "model.num_classes=4", "pretrain.enabled=false")
    finetune_model = build_model(finetune_cfg)
    report = init_from_checkpoint(finetune_model, None, load_checkpoint(checkpoint))
    class_head = {k for k in finetune_model.state_dict() if ".fc_cls." in k}
    assert set(report.reinitialised) == class_head  # one "object" class -> 4 categories
    assert set(report.loaded) == set(finetune_model.state_dict()) - class_head
    assert report.missing == [] and report.skipped == ["objective.projection.weight"]
    state = finetune_model.state_dict()
    torch.testing.assert_close(state["proposal_features"], pretrainer.model.state_dict()["proposal_features"])


@pytest.mark.slow
def test_cli_finetune_from_an_sp_checkpoint(synthetic, tmp_path, capsys) -> None:
    from sp_ray.cli import main

    cfg = _sp_config(tmp_path)
    pretrainer = _sp_trainable(cfg)
    init = save_checkpoint(tmp_path / "pretrained", model=pretrainer.model, objective=pretrainer.objective,
                           config=cfg, meta={"epoch": 1})
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        code = main([
            "finetune", "--config", str(TINY_CONFIG), "--work-dir", str(tmp_path / "ft"), "--init", str(init),
            f"data.train_annotations={synthetic['train']}", f"data.train_images={synthetic['images']}",
            *TINY, "train.epochs=1",
        ])  # fmt: skip
    finally:
        ray.shutdown()
    assert code == 0
    assert "final checkpoint" in capsys.readouterr().out
    final = load_checkpoint(tmp_path / "ft" / "final")
    assert final.config.model.name == "queryinst" and final.meta["epoch"] == 1
