"""Every model family through the same checks: output shapes and keys, batched equals single image, an image
without targets, more targets than queries, a NaN image, a training step that lowers the loss, export parity.

Each family is its demo tiny config (configs/demo/<family>_tiny_synthetic.yaml) shrunk further by ``TINY``
so that a check takes seconds on a CPU. The expected values come from the config (queries, classes, stages),
from the family's documented mask stride, from the loss going down, or from PyTorch (export parity); never
from the code under test. What only one family does is tested in its own file (test_knet.py, ...).

The training API (``build_model``, ``Trainable``, ``build_objective``, ``train_step``) is used in one place only,
``Training`` below.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from sp_ray.config import Config, load_config
from sp_ray.data.transforms import mask_boxes
from sp_ray.errors import NonFiniteLossError
from sp_ray.models import FAMILIES, build_model
from sp_ray.objectives import Trainable, build_objective
from sp_ray.train.loop import train_step
from sp_ray.train.optim import build_optimizer, build_scheduler
from sp_ray.types import Target

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
B, H, W = 2, 64, 96  # 64 x 96: not square, so that H and W cannot be swapped unnoticed
NUM_CLASSES = 3
# Smaller than the demo's tiny models: 8 queries of 32 channels, the fewest stages each family allows.
TINY: dict[str, list[str]] = {
    "knet": ["model.num_kernels=8", "model.feat_channels=32", "model.ffn_channels=64", "model.num_heads=2",
             "model.num_stages=2"],
    "mask2former": ["model.num_kernels=8", "model.feat_channels=32", "model.ffn_channels=64", "model.num_heads=2",
                    "model.num_stages=3", "model.encoder_layers=1", "model.encoder_ffn_channels=64",
                    "loss.num_points=256"],
    "queryinst": ["model.num_kernels=8", "model.feat_channels=32", "model.dynamic_channels=8",
                  "model.ffn_channels=64", "model.num_heads=2", "model.num_stages=2"],
    "maskrcnn": ["eval.topk=10"],
}  # fmt: skip
COMMON = [f"model.num_classes={NUM_CLASSES}", f"data.max_size={H}", f"data.short_size={H}", "data.flip_prob=0.0",
          "model.depth=18", "model.frozen_stages=-1", "model.norm_eval=false"]  # fmt: skip
# The mask stride of each query family's pred_masks (its paper's): K-Net 1/8, Mask2Former and QueryInst 1/4.
MASK_STRIDE = {"knet": 8, "mask2former": 4, "queryinst": 4}
QUERY_FAMILIES = sorted(MASK_STRIDE)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_the_checks_cover_every_family() -> None:
    assert sorted(TINY) == sorted(FAMILIES)
    assert set(QUERY_FAMILIES) | {"maskrcnn"} == set(FAMILIES)
    for name in QUERY_FAMILIES:
        assert FAMILIES[name].mask_stride == MASK_STRIDE[name]
    assert FAMILIES["maskrcnn"].mask_stride is None  # per-RoI masks


families = pytest.mark.parametrize("family", sorted(FAMILIES))
query_families = pytest.mark.parametrize("family", QUERY_FAMILIES)


def tiny_config(family: str, *extra: str) -> Config:
    return load_config(CONFIGS / f"{family}_tiny_synthetic.yaml", [*COMMON, *TINY[family], *extra])


# --- the training API, in one place ------------------------------------------------------------------------


class Training:
    """A family's pure model and the ``Trainable`` that trains it (CONTRACT.md): ``build_model(cfg)``, then
    ``Trainable(model, build_objective(cfg, model))``, stepped by ``sp_ray.train.loop.train_step``. The one place
    of this file that knows the training API."""

    def __init__(self, cfg: Config, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.cfg = cfg
        self.model = build_model(cfg)
        if cfg.model.name == "maskrcnn":
            _fewer_rois(self.model)
        self.trainable = Trainable(self.model, build_objective(cfg, self.model))

    def losses(self, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        """The training loss dict of one batch (train mode), with its graph."""
        return self.trainable.train()(images, targets)

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.trainable.parameters() if p.requires_grad]

    def optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = build_optimizer(self.trainable, self.cfg.train)
        return optimizer, build_scheduler(optimizer, self.cfg.train, iters_per_epoch=1)

    def step(self, images: Tensor, targets: list[Target], optimizer, scheduler) -> dict[str, float]:
        """One step of the training loop (``train_step``): the float losses and their sum under ``loss``."""
        return train_step(self.trainable, images, targets, optimizer, scheduler, grad_clip=self.cfg.train.grad_clip)


def _fewer_rois(model: nn.Module) -> None:
    """Mask R-CNN's proposal and RoI counts are torchvision's (2000 proposals and 512 sampled RoIs per training
    image, 1000 proposals in evaluation), not config settings: fewer make a CPU step take a second, not ten."""
    model.rpn._pre_nms_top_n = model.rpn._post_nms_top_n = {"training": 100, "testing": 50}
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 64


# --- data ---------------------------------------------------------------------------------------------------


def _images(seed: int = 1) -> Tensor:
    torch.manual_seed(seed)
    return torch.rand(B, 3, H, W) * 255


def _target(boxes: list[tuple[int, int, int, int]], labels: list[int], image_id: int = 0) -> Target:
    """A target of rectangles (y0, y1, x0, x1) in the padded input frame."""
    masks = torch.zeros(len(boxes), H, W, dtype=torch.bool)
    for mask, (y0, y1, x0, x1) in zip(masks, boxes, strict=True):
        mask[y0:y1, x0:x1] = True
    return {"labels": torch.tensor(labels, dtype=torch.int64), "masks": masks, "boxes": mask_boxes(masks),
            "image_id": image_id, "orig_size": (H, W), "image_size": (H, W)}  # fmt: skip


def _empty() -> Target:
    return _target([], [])


def _scene() -> tuple[Tensor, list[Target]]:
    """Two images of coloured rectangles on black (red = class 0, blue = 1, green = 2), three objects; image ids
    10 and 11."""
    colours = torch.tensor([[220.0, 40.0, 40.0], [40.0, 40.0, 220.0], [40.0, 220.0, 40.0]])
    layouts = [([(8, 40, 8, 40), (24, 56, 56, 88)], [0, 1]), ([(16, 48, 40, 80)], [2])]
    images = torch.zeros(B, 3, H, W)
    targets = []
    for i, (image, (boxes, labels)) in enumerate(zip(images, layouts, strict=True)):
        for (y0, y1, x0, x1), label in zip(boxes, labels, strict=True):
            image[:, y0:y1, x0:x1] = colours[label][:, None, None]
        targets.append(_target(boxes, labels, image_id=10 + i))
    return images, targets


def _assert_finite_and_flowing(training: Training, losses: dict[str, Tensor]) -> None:
    """Every loss finite; backward gives finite gradients, non-zero ones among them in the backbone."""
    assert losses and all(torch.isfinite(v).all() for v in losses.values()), losses
    total = sum(losses.values())
    total.backward()
    params = dict(training.model.named_parameters())
    grads = {n: p.grad for n, p in params.items() if p.requires_grad and p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(n.startswith("backbone.") and g.abs().sum() > 0 for n, g in grads.items())


# --- outputs ------------------------------------------------------------------------------------------------


@query_families
@pytest.mark.parametrize("train", [False, True])
def test_query_model_outputs_have_the_configured_shapes(family: str, train: bool) -> None:
    cfg = tiny_config(family)
    model = Training(cfg).model.train(train)
    with torch.no_grad():
        out = model(_images())
    n, c, d, stages = cfg.model.num_kernels, NUM_CLASSES, cfg.model.feat_channels, cfg.model.num_stages
    h, w = H // MASK_STRIDE[family], W // MASK_STRIDE[family]
    assert {"pred_logits", "pred_masks", "pred_kernels", "aux_outputs", "init_masks", "init_kernels"} <= set(out)
    assert len(out["aux_outputs"]) == stages - 1
    for stage in [*out["aux_outputs"], out]:
        assert stage["pred_logits"].shape == (B, n, c)
        assert stage["pred_masks"].shape == (B, n, h, w)
        assert stage["pred_kernels"].shape == (B, n, d)
        assert torch.isfinite(stage["pred_logits"]).all() and torch.isfinite(stage["pred_masks"]).all()
        if family == "queryinst":
            assert stage["pred_boxes"].shape == (B, n, 4)
    assert out["init_masks"].shape == (B, n, h, w) and out["init_kernels"].shape == (B, n, d)


def test_maskrcnn_outputs_are_flat_detections_at_most_topk_per_image() -> None:
    cfg = tiny_config("maskrcnn")
    model = Training(cfg).model.eval()
    with torch.no_grad():
        out = model(_images())
    m = len(out["scores"])
    assert {"boxes", "scores", "labels", "masks", "batch_index"} <= set(out)
    assert out["boxes"].shape == (m, 4) and out["labels"].shape == out["batch_index"].shape == (m,)
    assert out["masks"].shape[0] == m and out["masks"].dim() == 3
    assert all(int((out["batch_index"] == b).sum()) <= cfg.eval.topk for b in range(B))
    assert m == 0 or (0 <= int(out["labels"].min()) and int(out["labels"].max()) < NUM_CLASSES)


@families
def test_batched_equals_single_image_in_eval(family: str) -> None:
    model = Training(tiny_config(family)).model.eval()  # BatchNorm on its running statistics
    images = _images()
    with torch.no_grad():
        batched = model(images)
        singles = [model(images[i : i + 1]) for i in range(B)]
    if family == "maskrcnn":
        for b, single in enumerate(singles):
            keep = batched["batch_index"] == b
            torch.testing.assert_close(batched["scores"][keep], single["scores"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(batched["boxes"][keep], single["boxes"], rtol=1e-4, atol=1e-3)
            assert torch.equal(batched["labels"][keep], single["labels"])
        return
    tensors = sorted(key for key, value in batched.items() if isinstance(value, Tensor))
    assert {"pred_logits", "pred_masks", "pred_kernels", "init_masks", "init_kernels"} <= set(tensors)
    for key in tensors:
        single = torch.cat([s[key] for s in singles])
        # QueryInst pastes its RoI masks at its boxes: logits fall by up to 40 per cell across a box border, so
        # box noise of 1e-5 shows there.
        atol = 2e-2 if (family, key) == ("queryinst", "pred_masks") else 1e-3
        torch.testing.assert_close(batched[key], single, rtol=1e-4, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


# --- targets ------------------------------------------------------------------------------------------------


@families
@pytest.mark.parametrize("which", ["one", "all"])
def test_images_without_targets_give_a_finite_loss_and_gradients(family: str, which: str) -> None:
    training = Training(tiny_config(family))
    images, targets = _scene()
    targets = [targets[0], _empty()] if which == "one" else [_empty(), _empty()]
    _assert_finite_and_flowing(training, training.losses(images, targets))


@families
def test_more_targets_than_queries(family: str) -> None:
    cfg = tiny_config(family)
    training = Training(cfg)
    # Mask R-CNN has no queries: more targets than the detections it keeps per image.
    count = cfg.model.num_kernels + 3 if family in MASK_STRIDE else cfg.eval.topk + 3
    boxes = [(4 * (i % 8), 4 * (i % 8) + 24, 6 * i % 72, 6 * i % 72 + 24) for i in range(count)]
    targets = [_target(boxes, [i % NUM_CLASSES for i in range(count)]), _target(boxes[:1], [1])]
    _assert_finite_and_flowing(training, training.losses(_images(), targets))


# --- training -----------------------------------------------------------------------------------------------


@families
def test_a_nan_image_is_a_clear_error_naming_the_input(family: str) -> None:
    training = Training(tiny_config(family))
    images, targets = _scene()
    images[1, 0, 3, 5] = float("nan")
    optimizer, scheduler = training.optimizer()
    before = [p.detach().clone() for p in training.parameters()]
    # Not "lower train.lr": BatchNorm spreads the NaN to every output, and QueryInst's roi_align crashed on it.
    with pytest.raises(NonFiniteLossError, match=r"images are not finite: NaN or inf in image 1 \(image_id 11\) "):
        training.step(images, targets, optimizer, scheduler)
    assert all(torch.equal(a, p) for a, p in zip(before, training.parameters(), strict=True))  # step not applied


# Adam's rate for the few steps of the training check: Mask2Former's loss moves slowly at 1e-3, Mask R-CNN's jumps.
STEP_LR = {"knet": 1e-3, "mask2former": 2e-3, "queryinst": 1e-3, "maskrcnn": 3e-4}


@families
def test_training_steps_on_one_batch_lower_the_loss(family: str) -> None:
    training = Training(tiny_config(family, f"train.lr={STEP_LR[family]}", "train.warmup_iters=0",
                                    "train.weight_decay=0"))  # fmt: skip
    images, targets = _scene()
    optimizer, scheduler = training.optimizer()
    history = [training.step(images, targets, optimizer, scheduler)["loss"] for _ in range(8)]
    assert all(math.isfinite(v) for v in history), history
    assert history[-1] < 0.8 * history[0], history


# --- export -------------------------------------------------------------------------------------------------


@families
def test_export_of_the_random_model_matches_torch(family: str, tmp_path) -> None:
    """fp32 ONNX against PyTorch on the parity images, as ``sp-ray export`` checks it (tests/export)."""
    from export.exporter.onnx_export import check_parity, export_model, model_info, sample_images
    from export.runtime import Segmenter, prepare_batch

    cfg = tiny_config(family, "eval.topk=10")
    model = Training(cfg).model.eval()
    # A fixed size and batch: a dynamic export takes three times as long (tests/export covers dynamic ones).
    info = model_info(cfg, class_names=["a", "b", "c"], cat_ids=[1, 2, 5], input_size=(H, H), batch_size=1)
    images = sample_images(None, count=3)
    sample, _ = prepare_batch(images[:1], info)
    path = export_model(model, info, tmp_path / f"{family}.onnx", sample=sample)
    report = check_parity(model, path, images, threads=1)
    assert report.precision == "fp32" and report.detections > 0 and report.passed, report.summary()
    assert Segmenter(path, providers=["CPUExecutionProvider"], threads=1).info.family == family
