"""The Mask R-CNN baseline: torchvision's architecture, our data conventions, training and evaluation; the checks
of every family (batched = single, no targets, NaN input, export) are in test_families.py."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import maskrcnn_resnet50_fpn

from sp_ray.checkpoint import load_init_weights
from sp_ray.config import load_config
from sp_ray.data.coco import CocoInstanceDataset
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.data.transforms import build_transforms, collate
from sp_ray.evaluation.coco_eval import predict_coco
from sp_ray.models import FAMILIES, build_model
from sp_ray.models.knet import build_knet
from sp_ray.models.maskrcnn import MaskRCNN, build_maskrcnn, postprocess_maskrcnn
from sp_ray.objectives import MaskRCNNObjective, Trainable, build_objective
from sp_ray.train.loop import train_step
from sp_ray.train.optim import build_optimizer, build_scheduler

C = 4
SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny(**overrides) -> MaskRCNN:
    torch.manual_seed(0)
    kwargs = dict(num_classes=C, depth=18, frozen_stages=-1, norm_eval=True, detections_per_image=10,
                  test_proposals=50)
    kwargs.update(overrides)
    return build_maskrcnn(**kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_images=6, image_size=SIZE, seed=1)


@pytest.fixture(scope="module")
def batch(data):
    transforms = build_transforms(train=False, max_size=SIZE, short_size=SIZE)
    dataset = CocoInstanceDataset(data["train"], data["images"], transforms=transforms)
    images, targets = collate([dataset[0], dataset[1]])
    return images, targets


def test_r50_has_the_modules_and_shapes_of_torchvision_maskrcnn_resnet50_fpn() -> None:
    ours = build_maskrcnn(num_classes=C, depth=50).state_dict()
    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=C + 1).state_dict()
    renamed = {}
    for name, tensor in reference.items():
        for old, new in (("backbone.body.", "backbone."), ("backbone.fpn.", "fpn.")):
            if name.startswith(old):
                name = new + name[len(old):]
        renamed[name] = tensor.shape
    assert {k: v.shape for k, v in ours.items() if not k.endswith("num_batches_tracked")} == {
        k: v for k, v in renamed.items() if not k.endswith("num_batches_tracked")
    }


def test_eval_output_is_flat_sorted_and_uses_contiguous_labels() -> None:
    model = _tiny().eval()
    images = torch.randint(0, 256, (2, 3, SIZE, 96), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
    m = len(out["scores"])
    assert out["boxes"].shape == (m, 4) and out["masks"].shape == (m, 28, 28)
    assert out["batch_index"].shape == (m,)
    assert m > 0, "score threshold 0 keeps detections even for a random model"
    assert out["labels"].min() >= 0 and out["labels"].max() < C
    assert torch.all(out["batch_index"][1:] >= out["batch_index"][:-1])
    for b in range(2):
        scores = out["scores"][out["batch_index"] == b]
        assert len(scores) <= 10
        assert torch.all(scores[1:] <= scores[:-1])
    assert out["masks"].min() >= 0 and out["masks"].max() <= 1
    assert out["boxes"][:, 2].max() <= 96 and out["boxes"][:, 3].max() <= SIZE


def test_bad_inputs_raise() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.zeros(3, SIZE, SIZE))
    with pytest.raises(ValueError, match="multiples of 32"):
        model.eval()(torch.zeros(1, 3, 50, 64))
    with pytest.raises(ValueError, match="eval mode only"):
        model.train()(torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="one target per image"):
        MaskRCNNObjective()(model.train(), torch.zeros(1, 3, SIZE, SIZE), [])
    with pytest.raises(ValueError, match="depth"):
        build_maskrcnn(num_classes=C, depth=101)


def test_train_step_on_synthetic_data_including_an_image_without_instances(batch) -> None:
    images, targets = batch
    empty = {**targets[1], "labels": targets[1]["labels"][:0], "masks": targets[1]["masks"][:0],
             "boxes": targets[1]["boxes"][:0]}
    targets = [targets[0], empty]
    model = _tiny(norm_eval=False)
    trainable = Trainable(model, MaskRCNNObjective())
    cfg = load_config(None, ["train.lr=1e-3", "train.warmup_iters=0"]).train
    optimizer = build_optimizer(trainable, cfg)
    scheduler = build_scheduler(optimizer, cfg, iters_per_epoch=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values = train_step(trainable, images, targets, optimizer, scheduler, grad_clip=4.0)
    assert set(values) == {
        "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg", "loss"
    }
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    state = model.state_dict()
    changed = [k for k, v in state.items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed)
    assert any(k.startswith("roi_heads.") for k in changed)


def test_frozen_stages_follow_mmdet_semantics_and_keep_frozen_batchnorm_in_eval() -> None:
    model = _tiny(frozen_stages=1, norm_eval=False)
    grads = {name: p.requires_grad for name, p in model.backbone.named_parameters()}
    assert not grads["conv1.weight"] and not grads["layer1.0.conv1.weight"] and grads["layer2.0.conv1.weight"]
    model.train()
    assert not model.backbone.layer1[0].bn1.training and model.backbone.layer2[0].bn1.training
    assert all(p.requires_grad for p in _tiny(frozen_stages=-1).backbone.parameters())


def test_backbone_weights_load_from_a_local_torchvision_file(tmp_path) -> None:
    torch.manual_seed(3)
    reference = resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = _tiny(backbone_weights=str(path))
    torch.testing.assert_close(model.backbone.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    torch.testing.assert_close(model.backbone.bn1.running_var, reference.bn1.running_var)


def test_knet_backbone_initialises_the_maskrcnn_backbone() -> None:
    knet = build_knet(num_classes=C, depth=18, num_kernels=4, num_stages=1, feat_channels=32, ffn_channels=32,
                      num_heads=2)
    report = load_init_weights(_tiny(), knet.state_dict())
    assert "backbone.layer4.1.conv2.weight" in report.loaded
    assert not any(name.startswith(("fpn.", "rpn.", "roi_heads.")) for name in report.loaded)


def test_config_builds_the_family_and_its_postprocessor() -> None:
    cfg = load_config(
        None, ["model.name=maskrcnn", "model.depth=18", f"model.num_classes={C}", "eval.topk=7"]
    )
    model = build_model(cfg)
    assert isinstance(model, MaskRCNN)
    objective = build_objective(cfg, model)
    assert isinstance(objective, MaskRCNNObjective) and not objective.state_dict()
    assert model.roi_heads.detections_per_img == 7
    assert FAMILIES["maskrcnn"].postprocess is postprocess_maskrcnn


def test_postprocess_pastes_masks_at_the_original_size_and_scales_boxes() -> None:
    outputs = {
        "boxes": torch.tensor([[8.0, 8.0, 40.0, 24.0], [0.0, 0.0, 70.0, 64.0], [4.0, 4.0, 12.0, 12.0]]),
        "scores": torch.tensor([0.9, 0.3, 0.8]),
        "labels": torch.tensor([1, 2, 0]),
        "masks": torch.ones(3, 28, 28),
        "batch_index": torch.tensor([0, 0, 1]),
    }
    results = postprocess_maskrcnn(
        outputs, image_sizes=[(32, 64), (64, 64)], orig_sizes=[(64, 128), (32, 32)], score_threshold=0.5
    )
    first, second = results
    assert first["masks"].shape == (1, 64, 128) and first["labels"].tolist() == [1]
    torch.testing.assert_close(first["boxes"], torch.tensor([[16.0, 16.0, 80.0, 48.0]]))
    ys, xs = torch.nonzero(first["masks"][0], as_tuple=True)
    assert 14 <= ys.min() <= 17 and 47 <= ys.max() <= 50 and 14 <= xs.min() <= 17 and 79 <= xs.max() <= 82
    assert second["masks"].shape == (1, 32, 32)
    torch.testing.assert_close(second["boxes"], torch.tensor([[2.0, 2.0, 6.0, 6.0]]))


def test_coco_evaluation_runs_the_maskrcnn_family(data) -> None:
    cfg = load_config(None, ["model.name=maskrcnn", "model.depth=18", f"model.num_classes={C}",
                             f"data.max_size={SIZE}", f"data.short_size={SIZE}", "eval.topk=5"])
    dataset = CocoInstanceDataset(
        data["val"], data["images"], transforms=build_transforms(train=False, max_size=SIZE, short_size=SIZE)
    )
    model = _tiny(detections_per_image=5)
    results = predict_coco(model, dataset, cfg, device=torch.device("cpu"))
    assert len(results) == 5 * len(dataset)
    assert {r["image_id"] for r in results} == set(dataset.image_ids)
    assert all(r["category_id"] in dataset.cat_ids and len(r["bbox"]) == 4 for r in results)
