"""The paper-default configs (``configs/*_r50_*.yaml``) build their model and run one forward on a small image.

Random init (their ``model.backbone_weights`` is null: nothing is downloaded). The expected shapes are written
here from the papers' settings, not read from the code: mask strides (K-Net 8, Mask2Former and QueryInst 4),
Mask2Former's softmax head with its extra "no object" column.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sp_ray.config import load_config
from sp_ray.models import build_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*_r50_*.yaml"))
MASK_STRIDE = {"knet": 8, "mask2former": 4, "queryinst": 4}
HEIGHT, WIDTH = 64, 96


def test_every_family_has_paper_default_configs() -> None:
    names = {load_config(path).model.name for path in CONFIGS}
    assert names == {"knet", "mask2former", "queryinst", "maskrcnn"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_paper_config_builds_and_runs_one_forward(path: Path) -> None:
    cfg = load_config(path, [] if load_config(path).model.num_classes > 0 else ["model.num_classes=80"])
    assert cfg.model.depth == 50 and cfg.model.backbone_weights is None
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randint(0, 256, (1, 3, HEIGHT, WIDTH), dtype=torch.uint8).float()
    with torch.no_grad():
        outputs = model(images)
    name, classes = cfg.model.name, cfg.model.num_classes
    if name == "maskrcnn":
        boxes = outputs["boxes"]
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and boxes.shape[0] <= cfg.eval.topk
        assert outputs["masks"].shape[1:] == (28, 28)  # per-RoI masks of torchvision's mask head
        return
    queries, stride = cfg.model.num_kernels, MASK_STRIDE[name]
    assert outputs["pred_logits"].shape == (1, queries, classes)
    if name == "mask2former":
        assert outputs["pred_class_logits"].shape == (1, queries, classes + 1)
    assert outputs["pred_masks"].shape == (1, queries, HEIGHT // stride, WIDTH // stride)
    assert torch.isfinite(outputs["pred_logits"]).all() and torch.isfinite(outputs["pred_masks"]).all()


def test_knet_coco_fine_tuning_rotates_as_the_reference_and_pre_training_does_not() -> None:
    # METHODS.md 1.5: the reference's K-Net COCO fine-tuning has Rotate(level=3) (mmdet's default prob 0.5);
    # its pre-training pipeline (1.4) has none, and the pre-training config inherits the fine-tuning one.
    configs = Path(__file__).resolve().parents[1] / "configs"
    finetune = load_config(configs / "knet_r50_coco_finetune.yaml").data
    assert (finetune.rotate_level, finetune.rotate_prob, finetune.flip_prob) == (3, 0.5, 0.5)
    assert load_config(configs / "knet_r50_sp_pretrain.yaml").data.rotate_level == 0
