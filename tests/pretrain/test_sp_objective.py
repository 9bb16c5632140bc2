"""SP pre-training end to end on tiny synthetic pseudo masks: the objective's losses, training, checkpoint -> --init."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sp_ray.checkpoint import init_from_checkpoint, load_checkpoint
from sp_ray.config import ConfigError, load_config
from sp_ray.data.coco import CocoInstanceDataset
from sp_ray.data.synthetic import write_synthetic_dataset
from sp_ray.data.transforms import build_transforms, collate
from sp_ray.evaluation.kernel_analysis import CELL_INCHES, DPI, analyze_kernels
from sp_ray.models import build_model
from sp_ray.models.knet import KNet
from sp_ray.objectives import Trainable
from sp_ray.pretrain.sp_objective import SPObjective, build_sp_objective
from sp_ray.train.loop import fit

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUERY_CHANNELS = 24


def write_pseudo_masks(
    data: dict[str, Path], out: Path, *, seed: int = 0, class_aware: bool = False
) -> dict[str, Path]:
    """Pseudo masks as `sp-ray propose` writes them: the synthetic GT as one class and unit queries.

    Like real saliency queries (C5 features), the queries depend on what the mask shows: one random
    vector per shape class plus noise. ``class_aware``: the masks keep the synthetic dataset's categories,
    as CLIP's class vocabulary (``clip.vocabulary: classes``, UPLVP) writes them.
    """
    coco = json.loads(Path(data["train"]).read_text())
    annotations = []
    for index, ann in enumerate(coco["annotations"], start=1):
        category = ann["category_id"] if class_aware else 1
        annotations.append({**ann, "id": index, "category_id": category, "score": 1.0})
    pseudo = {
        "images": coco["images"],
        "annotations": annotations,
        "categories": coco["categories"] if class_aware else [{"id": 1, "name": "object"}],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotations.json").write_text(json.dumps(pseudo))
    rng = np.random.default_rng(seed)
    per_class = rng.standard_normal((len(coco["categories"]) + 1, QUERY_CHANNELS))
    noise = 0.1 * rng.standard_normal((len(annotations), QUERY_CHANNELS))
    queries = (per_class[[a["category_id"] for a in coco["annotations"]]] + noise).astype(np.float32)
    np.save(out / "prompts.npy", queries / np.linalg.norm(queries, axis=1, keepdims=True))
    return {"annotations": out / "annotations.json", "prompts": out / "prompts.npy", "images": data["images"]}


def tiny_pretrain_config(pseudo: dict[str, Path], *extra: str):
    return load_config(
        CONFIGS / "demo" / "knet_tiny_sp_pretrain.yaml",
        [
            f"data.train_annotations={pseudo['annotations']}",
            f"data.train_images={pseudo['images']}",
            "data.max_size=64",
            "data.short_size=64",
            "data.flip_prob=0.0",
            "model.frozen_stages=-1",
            "model.num_kernels=8",
            "model.feat_channels=32",
            "model.ffn_channels=64",
            "model.num_heads=2",
            "model.num_stages=2",
            "train.batch_size=3",
            "train.warmup_iters=2",
            "train.lr=1e-3",
            "train.lr_steps=[100]",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def pseudo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sp")
    data = write_synthetic_dataset(root / "synthetic", num_images=8, image_size=64, seed=5)
    return write_pseudo_masks(data, root / "pseudo")


@pytest.fixture(scope="module")
def pretrained(pseudo, tmp_path_factory) -> Path:
    """A short pre-training run (6 images, 12 epochs of 2 steps); returns its work dir."""
    work = tmp_path_factory.mktemp("pretrain")
    torch.manual_seed(0)
    fit(tiny_pretrain_config(pseudo, "train.epochs=12"), work, objective=build_sp_objective)
    return work


def _batch(pseudo, cfg):
    dataset = CocoInstanceDataset(
        pseudo["annotations"],
        pseudo["images"],
        transforms=build_transforms(train=False, max_size=64, short_size=64),
        extra_per_annotation=np.load(pseudo["prompts"]),
    )
    return collate([dataset[0], dataset[1]], size_divisor=32)


def _sp_trainable(cfg) -> Trainable:
    model = build_model(cfg)
    return Trainable(model, build_sp_objective(cfg, model))


def test_the_sp_objective_holds_what_pretraining_adds_to_a_plain_knet(pseudo):
    cfg = tiny_pretrain_config(pseudo, "model.num_classes=1")
    trainable = _sp_trainable(cfg)
    assert isinstance(trainable.model, KNet) and isinstance(trainable.objective, SPObjective)
    plain = build_model(tiny_pretrain_config(pseudo, "model.num_classes=1", "pretrain.enabled=false"))
    assert list(trainable.model.state_dict()) == list(plain.state_dict())
    assert list(trainable.objective.state_dict()) == ["projection.weight"]  # the fixed projection, a buffer
    # The optimizer sees the model's parameters first, then the objective's.
    names = [name for name, _ in trainable.named_parameters()]
    assert names[: len(list(plain.parameters()))] == ["model." + n for n, _ in plain.named_parameters()]


@pytest.mark.parametrize(
    ("source", "rule", "projection"), [("feature", "cosine", "fixed"), ("image", "fixed", "learned")]
)
def test_forward_returns_every_loss_and_gradients_reach_the_heads(pseudo, source, rule, projection):
    cfg = tiny_pretrain_config(
        pseudo,
        "model.num_classes=1",
        f"pretrain.prompt_source={source}",
        f"pretrain.prompt_rule={rule}",
        f"pretrain.kernel_projection={projection}",
        "pretrain.image_prompt_size=32",
    )
    torch.manual_seed(0)
    model = _sp_trainable(cfg)
    images, targets = _batch(pseudo, cfg)
    losses = model(images.float(), targets)
    expected = {"loss_mask_s0", "loss_dice_s0"} | {
        f"loss_{name}_s{i}" for i in (1, 2) for name in ("cls", "mask", "dice", "ker")
    }
    if projection == "learned":
        expected.add("loss_ker_angle")
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    assert losses["loss_ker_s1"] > 0
    sum(losses.values()).backward()
    assert model.model.stages[0].fc_cls.weight.grad is not None
    if source == "image":
        assert model.objective.prompt_encoder.proj.weight.grad.abs().sum() > 0
    if projection == "learned":
        assert model.objective.projection.weight.grad.abs().sum() > 0


def test_targets_without_queries_are_an_error(pseudo):
    model = _sp_trainable(tiny_pretrain_config(pseudo, "model.num_classes=1"))
    images, targets = _batch(pseudo, None)
    del targets[1]["queries"]
    with pytest.raises(ValueError, match=r"images \[1\] have no 'queries'"):
        model(images.float(), targets)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("pretrain.prompt_rule=hungarian", "prompt_rule"),
        ("data.val_annotations=x.json", "val_annotations"),
        ("pretrain.kernel_projection=ema", "kernel_projection"),
        ("pretrain.prompts=missing.npy", "missing.npy"),
    ],
)
def test_bad_pretrain_settings_are_named(pseudo, override, match):
    with pytest.raises((ConfigError, FileNotFoundError), match=match):
        _sp_trainable(tiny_pretrain_config(pseudo, "model.num_classes=1", override))


def test_pretraining_loss_falls(pretrained):
    lines = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    first, last = lines[0], lines[-1]
    assert last["loss"] < 0.7 * first["loss"], (first["loss"], last["loss"])
    # The kernels learn the queries of their masks: L_ker of the last stage falls too.
    assert last["loss_ker_s2"] < 0.9 * first["loss_ker_s2"], (first["loss_ker_s2"], last["loss_ker_s2"])


def test_finetune_init_loads_every_backbone_neck_and_kernel_tensor(pretrained, pseudo):
    ckpt = load_checkpoint(pretrained / "final")
    assert ckpt.config.pretrain.enabled and ckpt.config.model.num_classes == 1
    finetune_cfg = tiny_pretrain_config(pseudo, "model.num_classes=4", "pretrain.enabled=false")
    model = build_model(finetune_cfg)
    report = init_from_checkpoint(model, None, ckpt)
    own = set(model.state_dict())
    backbone = {k for k in own if k.startswith("backbone.")}
    assert backbone and backbone <= set(report.loaded)
    heads = {k for k in own if k.split(".")[0] in ("fpn", "localization", "init_kernels", "stages")}
    class_head = {k for k in own if ".fc_cls." in k}
    assert heads - class_head <= set(report.loaded)
    assert set(report.reinitialised) == class_head  # one "object" class -> 4 categories
    assert report.missing == []
    assert report.skipped == ["objective.projection.weight"]
    state = model.state_dict()
    for name in report.loaded:
        torch.testing.assert_close(state[name], ckpt.model_state[name])


def test_dataset_queries_follow_their_instances_through_collate(pseudo):
    prompts = np.load(pseudo["prompts"])
    images, targets = _batch(pseudo, None)
    coco = json.loads(Path(pseudo["annotations"]).read_text())
    for target in targets:
        ids = [a["id"] for a in coco["annotations"] if a["image_id"] == target["image_id"]]
        assert target["queries"].dtype == torch.float32
        torch.testing.assert_close(target["queries"], torch.from_numpy(prompts[[i - 1 for i in ids]]))
        assert target["queries"].shape[0] == target["masks"].shape[0]


def test_analyze_kernels_reads_the_pretraining_checkpoint(pretrained, pseudo, tmp_path):
    summary = analyze_kernels(
        pretrained / "final",
        pseudo["annotations"],
        tmp_path / "k.png",
        image_root=pseudo["images"],
        num_images=4,
    )
    assert summary["kernels"] == 8 and summary["grid"] == [3, 3] and summary["images"] == 4
    with Image.open(tmp_path / "k.png") as png:
        assert png.size == (round(3 * CELL_INCHES * DPI), round(3 * CELL_INCHES * DPI))


def test_analyze_kernels_without_decodable_images_says_so(pretrained, pseudo, tmp_path):
    with pytest.raises(ValueError, match="none of the 2 images could be decoded"):
        analyze_kernels(pretrained / "final", pseudo["annotations"], tmp_path / "k.png", num_images=2)


def test_resume_restores_the_model_and_the_learned_projection(pseudo, tmp_path):
    """A stopped pre-training run continued with --resume ends where the straight run ends: objective.pt (the
    learned L_ker projection) is restored with model.pt."""
    extra = ("model.num_stages=1", "pretrain.kernel_projection=learned")
    straight = tiny_pretrain_config(pseudo, "train.epochs=2", *extra)
    torch.manual_seed(0)
    fit(straight, tmp_path / "straight", objective=build_sp_objective)
    torch.manual_seed(0)
    fit(tiny_pretrain_config(pseudo, "train.epochs=1", *extra), tmp_path / "stopped", objective=build_sp_objective)
    first = load_checkpoint(tmp_path / "stopped" / "last").objective_state  # epoch 1
    fit(straight, tmp_path / "stopped", resume=tmp_path / "stopped" / "last", objective=build_sp_objective)
    a, b = load_checkpoint(tmp_path / "straight" / "final"), load_checkpoint(tmp_path / "stopped" / "final")
    assert a.objective_state and a.objective_state.keys() == b.objective_state.keys()
    assert a.model_state.keys() == b.model_state.keys()
    for state_a, state_b in ((a.model_state, b.model_state), (a.objective_state, b.objective_state)):
        for name in state_a:
            torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(first[name], b.objective_state[name]) for name in first)  # it trained on


def test_class_aware_pseudo_masks_pretrain_with_one_class_per_category_and_fine_tune(tmp_path):
    """UPLVP's pre-training: pseudo masks that carry the dataset's classes train K-Net with num_classes = C (not
    1); fine-tuning on the same classes then loads the class head too, on other classes re-initialises it."""
    data = write_synthetic_dataset(tmp_path / "synthetic", num_images=8, image_size=64, seed=5)
    classes = len(json.loads(Path(data["train"]).read_text())["categories"])
    assert classes == 4
    pseudo = write_pseudo_masks(data, tmp_path / "pseudo", class_aware=True)
    # num_classes 0 takes the count from the data; one step of all 6 images, the backbone frozen as in the paper.
    cfg = tiny_pretrain_config(
        pseudo, "model.num_classes=0", "train.epochs=1", "train.batch_size=6", "data.num_workers=0",
        "model.frozen_stages=4",
    )
    torch.manual_seed(0)
    fit(cfg, tmp_path / "work", objective=build_sp_objective)
    ckpt = load_checkpoint(tmp_path / "work" / "final")
    assert ckpt.config.pretrain.enabled and ckpt.config.model.num_classes == classes
    assert ckpt.model_state["stages.0.fc_cls.weight"].shape[0] == classes
    assert ckpt.meta["class_names"] == ["disk", "square", "triangle", "ring"]
    lines = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and np.isfinite(lines[0]["loss"])

    # The classification loss reads the class labels: the same masks as one class score differently.
    model = _sp_trainable(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=classes)))
    images, targets = _batch(pseudo, None)
    assert any(int(t["labels"].max()) > 0 for t in targets)
    torch.manual_seed(0)
    labelled = model(images.float(), targets)
    torch.manual_seed(0)
    one_class = model(images.float(), [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets])
    assert all(torch.isfinite(v) for v in labelled.values())
    assert not torch.isclose(labelled["loss_cls_s1"], one_class["loss_cls_s1"])

    same = build_model(tiny_pretrain_config(pseudo, f"model.num_classes={classes}", "pretrain.enabled=false"))
    report = init_from_checkpoint(same, None, ckpt)
    class_head = {k for k in same.state_dict() if ".fc_cls." in k}
    assert class_head and class_head <= set(report.loaded) and report.reinitialised == []
    other = build_model(tiny_pretrain_config(pseudo, "model.num_classes=80", "pretrain.enabled=false"))
    other_head = {k for k in other.state_dict() if ".fc_cls." in k}
    assert set(init_from_checkpoint(other, None, ckpt).reinitialised) == other_head


def test_a_loaded_class_head_of_other_class_names_is_logged(caplog):
    from sp_ray.train.loop import _warn_on_other_class_names

    with caplog.at_level("WARNING", logger="sp_ray"):
        _warn_on_other_class_names("ckpt", ["kite", "pizza"], ["kite", "pizza"])  # same classes: silent
        _warn_on_other_class_names("ckpt", ["object"], ["person", "car"])  # re-initialised head: silent
        assert caplog.records == []
        _warn_on_other_class_names("ckpt", ["kite", "pizza"], ["kite", "donut"])
    assert len(caplog.records) == 1
    assert "label 1 was 'pizza' and is 'donut' here" in caplog.records[0].getMessage()
