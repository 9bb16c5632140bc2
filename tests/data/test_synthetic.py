from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sp_ray.data.coco import CocoInstanceDataset, DatasetSkipWarning
from sp_ray.data.synthetic import SYNTHETIC_CLASSES, write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(out, num_images=40, seed=0)
    return out


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _all_annotations(out: Path) -> list[dict]:
    return _load(out / "train.json")["annotations"] + _load(out / "val.json")["annotations"]


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    first = write_synthetic_dataset(tmp_path / "a", num_images=6, image_size=64, seed=5)
    second = write_synthetic_dataset(tmp_path / "b", num_images=6, image_size=64, seed=5)
    third = write_synthetic_dataset(tmp_path / "c", num_images=6, image_size=64, seed=6)
    assert set(first) == {"images", "train", "val"}
    for key in ("train", "val"):
        assert first[key].read_bytes() == second[key].read_bytes()
    files = sorted(p.name for p in first["images"].iterdir())
    assert len(files) == 6 and files == sorted(p.name for p in second["images"].iterdir())
    for name in files:
        assert (first["images"] / name).read_bytes() == (second["images"] / name).read_bytes()
    assert first["train"].read_bytes() != third["train"].read_bytes()


def test_split_and_categories(dataset_dir: Path) -> None:
    train, val = _load(dataset_dir / "train.json"), _load(dataset_dir / "val.json")
    assert len(train["images"]) == 32 and len(val["images"]) == 8
    train_ids = {image["id"] for image in train["images"]}
    val_ids = {image["id"] for image in val["images"]}
    assert train_ids.isdisjoint(val_ids) and len(train_ids | val_ids) == 40
    assert all(ann["image_id"] in train_ids for ann in train["annotations"])
    assert all(ann["image_id"] in val_ids for ann in val["annotations"])
    assert [c["name"] for c in train["categories"]] == list(SYNTHETIC_CLASSES)
    assert len(SYNTHETIC_CLASSES) == 4
    annotations = _all_annotations(dataset_dir)
    per_image = [sum(ann["image_id"] == i for ann in annotations) for i in train_ids | val_ids]
    assert max(per_image) <= 8


def test_all_categories_and_scale_bins_present(dataset_dir: Path) -> None:
    annotations = _all_annotations(dataset_dir)
    assert {ann["category_id"] for ann in annotations} == {1, 2, 3, 4}
    areas = np.array([ann["area"] for ann in annotations])
    assert (areas < 32**2).any()
    assert ((areas >= 32**2) & (areas < 96**2)).any()
    assert (areas >= 96**2).any()


def test_masks_match_area_and_bbox_and_do_not_overlap(dataset_dir: Path) -> None:
    annotations = _all_annotations(dataset_dir)
    union: dict[int, np.ndarray] = {}
    for ann in annotations:
        assert ann["iscrowd"] == 0
        segmentation = ann["segmentation"]
        assert isinstance(segmentation["counts"], str) and segmentation["size"] == [160, 160]
        mask = mask_utils.decode(segmentation).astype(bool)
        assert mask.sum() == ann["area"] >= 12
        ys, xs = np.nonzero(mask)
        expected_box = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert ann["bbox"] == [float(v) for v in expected_box]
        seen = union.setdefault(ann["image_id"], np.zeros_like(mask))
        assert not (seen & mask).any(), "occluded instances must keep only their visible part"
        seen |= mask


def test_loads_through_coco_dataset_without_skips(dataset_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetSkipWarning)
        dataset = CocoInstanceDataset(dataset_dir / "val.json", dataset_dir / "images")
    assert not dataset.skipped and len(dataset) == 8
    assert dataset.class_names == list(SYNTHETIC_CLASSES)
    image, target = dataset[0]
    assert image.shape == (3, 160, 160) and image.dtype == torch.uint8
    assert len(target["labels"]) >= 1 and target["masks"].flatten(1).any(dim=1).all()
    val = _load(dataset_dir / "val.json")
    first_id = dataset.image_ids[0]
    anns = [ann for ann in val["annotations"] if ann["image_id"] == first_id]
    assert target["labels"].tolist() == [ann["category_id"] - 1 for ann in anns]
    assert target["masks"].sum(dim=(1, 2)).tolist() == [ann["area"] for ann in anns]


def test_background_is_not_flat(dataset_dir: Path) -> None:
    dataset = CocoInstanceDataset(dataset_dir / "val.json", dataset_dir / "images")
    for index in range(len(dataset)):
        image, target = dataset[index]
        background = image[:, ~target["masks"].any(dim=0)].float()
        assert background.std(dim=1).mean() > 3.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_images": 1}, "num_images"),
        ({"image_size": 16}, "image_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"aspect_ratios": (1.5, 0.0)}, "aspect ratios"),
    ],
)
def test_bad_arguments_are_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_synthetic_dataset(tmp_path, **kwargs)


def test_aspect_ratios_give_landscape_and_portrait_images(tmp_path: Path) -> None:
    paths = write_synthetic_dataset(tmp_path / "mixed", num_images=12, image_size=64, seed=1,
                                    aspect_ratios=(4 / 3, 3 / 4))
    images = [image for split in ("train", "val") for image in json.loads(paths[split].read_text())["images"]]
    assert {(image["height"], image["width"]) for image in images} == {(48, 64), (64, 48)}
    # Every image and annotation reads as the json says (sizes, RLE sizes), nothing is skipped.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetSkipWarning)
        dataset = CocoInstanceDataset(paths["train"], paths["images"])
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert tuple(image.shape[-2:]) == target["orig_size"] == tuple(target["masks"].shape[-2:])
    assert sum(len(target["labels"]) for _, target in (dataset[i] for i in range(len(dataset)))) > 0
    # The ratios have their own random stream: ratio 1 gives the square images of the seed, byte for byte.
    square = write_synthetic_dataset(tmp_path / "square", num_images=4, image_size=64, seed=1)
    ratio_one = write_synthetic_dataset(tmp_path / "one", num_images=4, image_size=64, seed=1, aspect_ratios=(1.0,))
    for split in ("train", "val"):
        assert square[split].read_bytes() == ratio_one[split].read_bytes()
    for name in sorted(p.name for p in square["images"].iterdir()):
        assert (square["images"] / name).read_bytes() == (ratio_one["images"] / name).read_bytes()
