"""``sp-ray run`` refuses unusable data and bad options at once (exit 2, one line), before Ray or any step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sp_ray.cli import main

CATEGORIES = [{"id": 3, "name": "cell"}]


def coco(root: Path, *, images: int = 3, annotations: bool = True, categories: list | None = None) -> Path:
    folder = root / "imgs"
    folder.mkdir(parents=True, exist_ok=True)
    entries, anns = [], []
    for index in range(images):
        Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(folder / f"{index}.png")
        entries.append({"id": index + 1, "file_name": f"{index}.png", "width": 40, "height": 24})
        if annotations:
            anns.append({"id": index + 1, "image_id": index + 1, "category_id": 3, "iscrowd": 0, "area": 16.0,
                         "bbox": [2, 2, 4, 4], "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]})
    path = root / "a.json"
    path.write_text(json.dumps({"images": entries, "annotations": anns,
                                "categories": CATEGORIES if categories is None else categories}))
    return path


def refused(capsys, *argv: str) -> str:
    assert main(["run", *argv, "--out", "unused_out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sp-ray run: error: ") and "\n" not in err
    return err


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / "unused_out").exists()  # refused before anything was written


def test_no_images_found(tmp_path, capsys):
    annotations = coco(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds none of the 3 images" in refused(capsys, "--annotations", str(annotations), "--images", str(empty))


def test_no_annotations(tmp_path, capsys):
    annotations = coco(tmp_path, annotations=False)
    assert "has no annotations" in refused(capsys, "--annotations", str(annotations), "--images",
                                           str(tmp_path / "imgs"))


def test_no_categories(tmp_path, capsys):
    annotations = coco(tmp_path, categories=[])
    assert "empty 'categories' list" in refused(capsys, "--annotations", str(annotations), "--images",
                                                 str(tmp_path / "imgs"))


def test_not_coco(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in refused(capsys, "--annotations", str(bad), "--images", str(tmp_path))


def test_val_categories_must_match(tmp_path, capsys):
    annotations = coco(tmp_path)
    other = coco(tmp_path / "v", categories=[{"id": 9, "name": "other"}])
    err = refused(capsys, "--annotations", str(annotations), "--images", str(tmp_path / "imgs"),
                  "--val-annotations", str(other), "--val-images", str(tmp_path / "v" / "imgs"))
    assert "category ids [9]" in err and "same categories" in err


def test_one_image_cannot_hold_out_val(tmp_path, capsys):
    annotations = coco(tmp_path, images=1)
    assert "give --val-annotations" in refused(capsys, "--annotations", str(annotations), "--images",
                                               str(tmp_path / "imgs"))


def test_unlabeled_folder_without_images(tmp_path, capsys):
    annotations = coco(tmp_path)
    (tmp_path / "pool").mkdir()
    assert "holds no image files" in refused(capsys, "--annotations", str(annotations), "--images",
                                             str(tmp_path / "imgs"), "--unlabeled", str(tmp_path / "pool"))


@pytest.mark.parametrize(("override", "message"), [
    ("nope:train.epochs=1", "'nope' is not a step with a config"),
    ("baseline:train.epochs=1", "this run has no baseline step"),
    ("train.nope=1", "fits no step's config"),
    ("finetune:model.nope=1", "model.nope"),
])
def test_bad_overrides(tmp_path, capsys, override, message):
    annotations = coco(tmp_path)
    assert message in refused(capsys, "--annotations", str(annotations), "--images", str(tmp_path / "imgs"),
                              override)


def test_val_images_need_val_annotations(tmp_path, capsys):
    annotations = coco(tmp_path)
    assert "give --val-annotations too" in refused(capsys, "--annotations", str(annotations), "--images",
                                                   str(tmp_path / "imgs"), "--val-images", str(tmp_path))


def test_missing_backbone_file(tmp_path, capsys):
    annotations = coco(tmp_path)
    assert "--backbone-weights" in refused(capsys, "--annotations", str(annotations), "--images",
                                           str(tmp_path / "imgs"), "--backbone-weights", str(tmp_path / "no.pth"))
