"""`sp-ray data convert --format cityscapes` on a tiny two-city tree in the official layout.

Expected counts, areas and boxes are written here by hand from the drawn rectangles: an instanceIds PNG holds
them pixel for pixel; a polygons json is rendered by cityscapesscripts the way its json2instanceImg does, with
PIL's polygon fill, which covers the outline, so the rectangle (x0, y0)-(x1, y1) has (x1-x0+1) x (y1-y0+1)
pixels. pycocotools' area and box of each RLE are checked against the same numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sp_ray.cli import main
from sp_ray.data.cityscapes import convert_cityscapes
from sp_ray.data.coco import CocoInstanceDataset
from sp_ray.data.conversion import summary_path
from sp_ray.errors import UserError

H, W = 32, 64
# Cityscapes label ids (the official table): road 7, pole 17, person 24, rider 25, car 26, truck 27, bus 28,
# caravan 29 (has instances, not evaluated), bicycle 33.
ROAD, POLE, PERSON, RIDER, CAR, TRUCK, BUS, CARAVAN, BICYCLE = 7, 17, 24, 25, 26, 27, 28, 29, 33
EIGHT_CLASSES = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 31: "train", 32: "motorcycle",
                 33: "bicycle"}


def _image(path: Path, height: int = H, width: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, dtype=np.uint8)).save(path)


def _instance_ids(path: Path, ids: np.ndarray) -> None:
    # The official files are 16-bit greyscale PNGs (ids up to 33999); PIL reads them as mode I;16 or I.
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint16)).save(path)


def _polygons(path: Path, objects: list[dict], height: int = H, width: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"imgHeight": height, "imgWidth": width, "objects": objects}))


def _rect(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _build_tree(root: Path) -> None:
    img, gt = root / "leftImg8bit" / "train", root / "gtFine" / "train"
    # aachen 000000: instanceIds (and a polygons json that only --source polygons reads: one bus).
    ids = np.zeros((H, W), dtype=np.int32)
    ids[28:, :] = ROAD
    ids[3:9, 2:12] = CAR * 1000  # 6 x 10 = 60 px
    ids[3:7, 20:30] = CAR * 1000 + 1  # 4 x 10 = 40 px
    ids[10:20, 40:44] = PERSON * 1000  # 10 x 4 = 40 px
    ids[20:25, 50:60] = CAR  # a car group region: 5 x 10 = 50 px, iscrowd
    ids[25:28, 0:4] = CARAVAN * 1000  # not one of the 8 classes
    ids[0:2, 0:2] = BICYCLE * 1000  # one instance in two parts: 4 + 4 px, box the whole image
    ids[30:32, 62:64] = BICYCLE * 1000
    _image(img / "aachen" / "aachen_000000_000019_leftImg8bit.png")
    _instance_ids(gt / "aachen" / "aachen_000000_000019_gtFine_instanceIds.png", ids)
    _polygons(gt / "aachen" / "aachen_000000_000019_gtFine_polygons.json",
              [{"label": "bus", "polygon": _rect(1, 1, 10, 10)}])  # 10 x 10 = 100 px
    # aachen 000001: polygons only.
    _image(img / "aachen" / "aachen_000001_000019_leftImg8bit.png")
    _polygons(gt / "aachen" / "aachen_000001_000019_gtFine_polygons.json", [
        {"label": "road", "polygon": _rect(0, 28, 63, 31)},
        {"label": "rider", "polygon": _rect(5, 5, 14, 9)},  # 10 x 5 = 50 px
        {"label": "persongroup", "polygon": _rect(30, 10, 39, 14)},  # 50 px, iscrowd
        {"label": "truck", "polygon": _rect(40, 0, 49, 3)},  # 10 x 4, then 5 x 4 occluded by the pole
        {"label": "pole", "polygon": _rect(45, 0, 49, 3)},
        {"label": "car", "polygon": _rect(0, 15, 9, 20), "deleted": 1},  # not drawn
        {"label": "flyingcar", "polygon": _rect(0, 0, 3, 3)},
        {"label": "car", "polygon": [[0, 0], [5, 5]]},
        {"label": "car", "polygon": [[0, 0], [5, "x"], [5, 0]]},
        {"label": "car", "polygon": [[0, 0, 1], [5, 5], [5, 0]]},
        {"polygon": _rect(0, 0, 3, 3)},
    ])
    # bochum: an empty image, and every kind of broken input.
    road_only = np.full((H, W), ROAD, dtype=np.int32)
    _image(img / "bochum" / "bochum_000000_000313_leftImg8bit.png")
    _instance_ids(gt / "bochum" / "bochum_000000_000313_gtFine_instanceIds.png", road_only)
    _image(img / "bochum" / "bochum_000000_000600_leftImg8bit.png")  # no annotation
    _image(img / "bochum" / "bochum_000000_000700_leftImg8bit.png")
    (gt / "bochum" / "bochum_000000_000700_gtFine_instanceIds.png").write_bytes(b"not a png")
    _instance_ids(gt / "bochum" / "bochum_000000_000800_gtFine_instanceIds.png", road_only)  # no image
    _image(img / "bochum" / "bochum_000000_000900_leftImg8bit.png")
    _instance_ids(gt / "bochum" / "bochum_000000_000900_gtFine_instanceIds.png", road_only[:, :32])
    (img / "bochum" / "bochum_000000_001000_leftImg8bit.png").write_bytes(b"not an image")
    _instance_ids(gt / "bochum" / "bochum_000000_001000_gtFine_instanceIds.png", road_only)
    _image(img / "bochum" / "bochum_000000_001100_leftImg8bit.png")
    (gt / "bochum" / "bochum_000000_001100_gtFine_polygons.json").write_text('{"imgHeight": 32, ')


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("cityscapes")
    _build_tree(root)
    out = root / "coco" / "instances_train.json"
    summary = convert_cityscapes(root, "train", out)
    return root, out, summary


def _by_file(coco: COCO) -> dict[str, list[dict]]:
    return {image["file_name"]: coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])) for image in coco.dataset["images"]}


def _load(out: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(out))


def test_categories_are_the_eight_instance_classes_with_cityscapes_ids(converted: tuple[Path, Path, dict]) -> None:
    coco = _load(converted[1])
    assert {c["id"]: c["name"] for c in coco.dataset["categories"]} == EIGHT_CLASSES


def test_counts_per_class_crowd_and_empty_images(converted: tuple[Path, Path, dict]) -> None:
    _, out, summary = converted
    assert summary["images"] == 3
    assert summary["annotations"] == 8
    assert summary["instances_per_category"] == {"person": 1, "rider": 1, "car": 2, "truck": 1, "bus": 0,
                                                 "train": 0, "motorcycle": 0, "bicycle": 1}
    assert summary["crowd_per_category"] == {"person": 1, "rider": 0, "car": 1, "truck": 0, "bus": 0, "train": 0,
                                             "motorcycle": 0, "bicycle": 0}
    assert summary["images_without_instances"] == {"count": 1, "files": ["bochum/bochum_000000_000313_leftImg8bit.png"]}
    assert summary["sources"] == {"instanceIds": 2, "polygons": 1}
    assert json.loads(summary_path(out).read_text()) == summary


def test_every_broken_input_is_counted_and_named(converted: tuple[Path, Path, dict]) -> None:
    skipped = {reason: entry["files"] for reason, entry in converted[2]["skipped"].items()}
    assert skipped == {
        "image without annotation file": ["bochum/bochum_000000_000600_leftImg8bit.png"],
        "annotation file without image": ["bochum/bochum_000000_000800_gtFine_instanceIds.png"],
        "unreadable or malformed annotation file": ["bochum/bochum_000000_000700_gtFine_instanceIds.png",
                                                    "bochum/bochum_000000_001100_gtFine_polygons.json"],
        "annotation size differs from the image's": ["bochum/bochum_000000_000900_gtFine_instanceIds.png "
                                                     "(32x32, image 32x64)"],
        "missing or unreadable image file": ["bochum/bochum_000000_001000_leftImg8bit.png"],
        "polygon with a label Cityscapes does not define": [
            "aachen/aachen_000001_000019_gtFine_polygons.json: object 6 (label 'flyingcar')"],
        "polygon with fewer than 3 points": [
            "aachen/aachen_000001_000019_gtFine_polygons.json: object 7 (label 'car')"],
        "polygon with a coordinate that is not a finite number": [
            "aachen/aachen_000001_000019_gtFine_polygons.json: object 8 (label 'car')"],
        "object without a string label or a polygon of (x, y) points": [
            "aachen/aachen_000001_000019_gtFine_polygons.json: object 9 (label 'car')",
            "aachen/aachen_000001_000019_gtFine_polygons.json: object 10 (label None)"],
    }


def test_masks_areas_boxes_and_crowd_flags(converted: tuple[Path, Path, dict]) -> None:
    coco = _load(converted[1])
    anns = _by_file(coco)
    # (category, iscrowd, area, bbox [x, y, w, h]) by hand from the rectangles above.
    expected = {
        "aachen/aachen_000000_000019_leftImg8bit.png": [
            (PERSON, 0, 40, [40, 10, 4, 10]),
            (CAR, 1, 50, [50, 20, 10, 5]),
            (CAR, 0, 60, [2, 3, 10, 6]),
            (CAR, 0, 40, [20, 3, 10, 4]),
            (BICYCLE, 0, 8, [0, 0, 64, 32]),
        ],
        "aachen/aachen_000001_000019_leftImg8bit.png": [
            (PERSON, 1, 50, [30, 10, 10, 5]),
            (RIDER, 0, 50, [5, 5, 10, 5]),
            (TRUCK, 0, 20, [40, 0, 5, 4]),
        ],
        "bochum/bochum_000000_000313_leftImg8bit.png": [],
    }
    got = {name: [(a["category_id"], a["iscrowd"], a["area"], a["bbox"]) for a in items]
           for name, items in anns.items()}
    assert got == expected
    for items in anns.values():
        for ann in items:
            rle = coco.annToRLE(ann)
            assert int(mask_utils.area(rle)) == ann["area"]
            assert mask_utils.toBbox(rle).tolist() == ann["bbox"]
    image = coco.dataset["images"][0]
    assert (image["height"], image["width"]) == (H, W)


def test_sp_ray_loader_reads_the_json(converted: tuple[Path, Path, dict]) -> None:
    root, out, _ = converted
    dataset = CocoInstanceDataset(out, root / "leftImg8bit" / "train")
    assert len(dataset) == 3 and not dataset.skipped
    assert dataset.class_names == list(EIGHT_CLASSES.values())
    _, target = dataset[0]
    # Crowd regions are not training targets: the 4 instances of aachen 000000.
    assert target["masks"].shape == (4, H, W)
    assert target["masks"].sum(dim=(1, 2)).tolist() == [40, 60, 40, 8]


def test_source_picks_the_png_or_the_polygons(converted: tuple[Path, Path, dict], tmp_path: Path) -> None:
    root = converted[0]
    polygons = convert_cityscapes(root, "train", tmp_path / "polygons.json", source="polygons")
    assert polygons["sources"] == {"polygons": 2}
    assert polygons["instances_per_category"]["bus"] == 1 and polygons["instances_per_category"]["car"] == 0
    bus = [a for a in _load(tmp_path / "polygons.json").dataset["annotations"] if a["category_id"] == BUS]
    assert [(a["area"], a["bbox"]) for a in bus] == [(100, [1, 1, 10, 10])]
    pngs = convert_cityscapes(root, "train", tmp_path / "pngs.json", source="instance-ids")
    assert pngs["sources"] == {"instanceIds": 2}
    assert "aachen/aachen_000001_000019_leftImg8bit.png" in pngs["skipped"]["image without annotation file"]["files"]


def test_wrong_root_names_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"leftImg8bit/<split>/<city>/\*_leftImg8bit.png"):
        convert_cityscapes(tmp_path, "train", tmp_path / "out.json")
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(UserError, match="no \\*_leftImg8bit.png"):
        convert_cityscapes(tmp_path, "val", tmp_path / "out.json")
    with pytest.raises(UserError, match="train and val"):
        convert_cityscapes(tmp_path, "test", tmp_path / "out.json")


def test_cli_prints_the_summary(converted: tuple[Path, Path, dict], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.json"
    assert main(["data", "convert", "--format", "cityscapes", "--root", str(converted[0]), "--split", "train",
                 "--out", str(out)]) in (0, None)
    printed = capsys.readouterr().out
    assert "cityscapes train: 3 images, 8 annotations" in printed
    assert "person 1, rider 1, car 2, truck 1, bus 0, train 0, motorcycle 0, bicycle 1; crowd regions (iscrowd 1): 2" \
        in printed
    assert "image without annotation file: 1 (bochum/bochum_000000_000600_leftImg8bit.png)" in printed
    assert main(["data", "convert", "--format", "cityscapes", "--root", str(tmp_path / "nowhere"), "--split",
                 "train", "--out", str(out)]) == 2
    assert "expected ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png" in capsys.readouterr().err
