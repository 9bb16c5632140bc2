"""Per-annotation rows (SP's saliency queries) riding along with their instances in CocoInstanceDataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from sp_ray.data.coco import EMPTY_AFTER_TRANSFORM, CocoInstanceDataset
from sp_ray.data.transforms import build_transforms, collate

SIZE = 64


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [SIZE, SIZE], "counts": rle["counts"].decode("ascii")}


def _write(tmp_path: Path, masks: dict[int, np.ndarray]) -> Path:
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)).save(tmp_path / "a.png")
    annotations = [
        {"id": ann_id, "image_id": 1, "category_id": 1, "segmentation": _rle(mask), "iscrowd": 0}
        for ann_id, mask in masks.items()
    ]
    path = tmp_path / "annotations.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "height": SIZE, "width": SIZE}],
                "annotations": annotations,
                "categories": [{"id": 1, "name": "object"}],
            }
        )
    )
    return path


def _square(y: int, x: int, side: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y : y + side, x : x + side] = True
    return mask


def test_rows_follow_annotation_ids_through_flip_and_collate(tmp_path):
    path = _write(tmp_path, {3: _square(0, 0, 20), 1: _square(30, 30, 20)})
    rows = np.arange(4 * 5, dtype=np.float32).reshape(4, 5)
    dataset = CocoInstanceDataset(
        path,
        tmp_path,
        transforms=build_transforms(train=True, max_size=32, short_size=32, flip_prob=1.0),
        extra_per_annotation=rows,
    )
    _, targets = collate([dataset[0]], size_divisor=32)
    queries = targets[0]["queries"]
    assert queries.dtype == torch.float32
    torch.testing.assert_close(queries, torch.from_numpy(rows[[2, 0]]))  # ids 3 and 1, in json order
    # The flip moved the first mask to the right: its row still sits with it.
    assert targets[0]["boxes"][0, 0] > 10


def test_row_of_an_instance_that_vanishes_in_the_resize_is_dropped_with_it(tmp_path):
    speck = np.zeros((SIZE, SIZE), dtype=bool)
    speck[1, 1] = True  # nearest-neighbour downscaling by 4 samples rows and columns 0, 4, 8, ...
    path = _write(tmp_path, {1: _square(8, 8, 24), 2: speck})
    rows = np.eye(2, dtype=np.float32)
    dataset = CocoInstanceDataset(
        path,
        tmp_path,
        transforms=build_transforms(train=False, max_size=16, short_size=16),
        extra_per_annotation=rows,
    )
    _, target = dataset[0]
    assert dataset.skipped[EMPTY_AFTER_TRANSFORM] == 1
    assert target["masks"].shape[0] == 1
    torch.testing.assert_close(target["queries"], torch.tensor([[1.0, 0.0]]))


def test_image_without_instances_gets_an_empty_block(tmp_path):
    path = _write(tmp_path, {})
    dataset = CocoInstanceDataset(path, tmp_path, extra_per_annotation=np.ones((3, 7), dtype=np.float32))
    _, target = dataset[0]
    assert target["queries"].shape == (0, 7)


def test_without_rows_there_is_no_queries_field(tmp_path):
    path = _write(tmp_path, {1: _square(0, 0, 10)})
    item = CocoInstanceDataset(path, tmp_path)[0]
    _, batch = collate([item])
    assert "queries" not in item[1] and "queries" not in batch[0]


@pytest.mark.parametrize(
    ("rows", "match"), [(np.ones((1, 4), np.float32), "annotation id 2"), (np.ones(4, np.float32), "2-D")]
)
def test_rows_that_do_not_fit_the_json_are_an_error(tmp_path, rows, match):
    path = _write(tmp_path, {1: _square(0, 0, 10), 2: _square(20, 20, 10)})
    with pytest.raises(ValueError, match=match):
        CocoInstanceDataset(path, tmp_path, extra_per_annotation=rows)
