"""`sp-ray data convert --format ctw1500` on tiny train XML and test txt files in the official layout.

The files follow the released formats (train: one ``<Annotations><image><box><label/><segs/><pts/></box>``
XML per image, 14 absolute points in ``segs``; test: one ``x1,y1,...,####TEXT`` line per instance in
``000<id>.txt``). Areas and boxes are written by hand: the polygons are axis-aligned rectangles with points
along their edges, whose pycocotools rasterisation is exactly w x h pixels (checked against pycocotools too).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sp_ray.cli import main
from sp_ray.data.coco import CocoInstanceDataset
from sp_ray.data.ctw1500 import convert_ctw1500
from sp_ray.errors import UserError

H, W = 32, 64


def _rect14(x0: int, y0: int, x1: int, y1: int) -> list[int]:
    """A 14-point CTW1500 polygon tracing the rectangle: 7 points along the top, 7 back along the bottom."""
    xs = np.linspace(x0, x1, 7).round().astype(int).tolist()
    return [v for x in xs for v in (x, y0)] + [v for x in xs[::-1] for v in (x, y1)]


def _csv(values: list) -> str:
    return ",".join(str(v) for v in values)


def _box(segs: str | None, label: str = "TEXT") -> str:
    segs_xml = f"<segs>{segs}</segs>" if segs is not None else ""
    return (f'<box height="8" left="4" top="4" width="26"><label>{label}</label>{segs_xml}'
            '<pts x="6" y="8" /><pts x="12" y="8" /></box>')


def _xml(path: Path, image: str, boxes: list[str]) -> None:
    body = "\n  ".join(boxes)
    path.write_text(f'<Annotations>\n <image file="{image}">\n  {body}\n </image>\n</Annotations>\n')


def _jpg(path: Path) -> None:
    Image.fromarray(np.full((H, W, 3), 120, dtype=np.uint8)).save(path)


def _build_tree(root: Path) -> None:
    train_images, train_labels = root / "train_images", root / "ctw1500_train_labels"
    test_images, test_labels = root / "test_images", root / "ctw1500_test_labels"
    for folder in (train_images, train_labels, test_images, test_labels):
        folder.mkdir(parents=True)
    for name in ("0001.jpg", "0002.jpg", "0003.jpg", "0004.jpg"):
        _jpg(train_images / name)
    (train_images / "0006.jpg").write_bytes(b"not a jpeg")
    _xml(train_labels / "0001.xml", "0001.jpg", [
        _box(_csv(_rect14(4, 4, 30, 12)), "OLATHE"),  # 26 x 8 = 208 px
        _box(_csv(_rect14(34, 2, 60, 10)), "###"),  # illegible: iscrowd, 26 x 8 = 208 px
        _box(_csv(_rect14(4, 20, 30, 28)[:-1])),  # 27 numbers
        _box("4,20,abc," + _csv(_rect14(4, 20, 30, 28)[3:])),
        _box(None),
        _box("4,20,30,20"),
        _box(_csv(_rect14(100, 4, 120, 12))),  # right of the 64-pixel-wide image
    ])
    _xml(train_labels / "0002.xml", "0002.jpg", [])  # an image without text
    (train_labels / "0003.xml").write_text('<Annotations><image file="0003.jpg"><box')
    _xml(train_labels / "0005.xml", "0005.jpg", [_box(_csv(_rect14(4, 4, 30, 12)))])  # no image
    _xml(train_labels / "0006.xml", "0006.jpg", [_box(_csv(_rect14(4, 4, 30, 12)))])  # unreadable image
    # Test: 1001 with a 16-point line and an illegible one; 1002 with an odd line and one without ####text.
    for name in ("1001.jpg", "1002.jpg"):
        _jpg(test_images / name)
    sixteen = [v for x in range(2, 17, 2) for v in (x, 3)] + [v for x in range(16, 1, -2) for v in (x, 9)]
    (test_labels / "0001001.txt").write_text(
        _csv(sixteen) + ",####E-313\n" + _csv(_rect14(30, 20, 50, 30)) + ",#######\n\n")
    (test_labels / "0001002.txt").write_text(
        _csv(_rect14(1, 1, 11, 5)[:-1]) + ",####ODD\n" + _csv(_rect14(10, 10, 40, 20)) + "\n")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ctw1500")
    _build_tree(root)
    return root


def _load(out: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(out))


def test_train_xml_counts_and_every_broken_input_named(root: Path, tmp_path: Path) -> None:
    summary = convert_ctw1500(tmp_path / "train.json", root=root, split="train")
    assert summary["images"] == 2 and summary["annotations"] == 2
    assert summary["instances_per_category"] == {"text": 1}
    assert summary["crowd_per_category"] == {"text": 1}
    assert summary["images_without_instances"]["files"] == ["0002.jpg"]
    skipped = {reason: entry["files"] for reason, entry in summary["skipped"].items()}
    assert skipped == {
        "image without annotation file": ["0004.jpg"],
        "annotation file without image": ["0005.xml"],
        "unreadable or malformed annotation file": ["0003.xml"],
        "missing or unreadable image file": ["0006.jpg"],
        "polygon with an odd number of coordinates": ["0001.xml: box 3"],
        "polygon with a coordinate that is not a finite number": ["0001.xml: box 4"],
        "text box without a <segs> polygon": ["0001.xml: box 5"],
        "polygon with fewer than 3 points": ["0001.xml: box 6"],
        "polygon without pixels inside the image": ["0001.xml: box 7"],
    }


def test_train_polygons_kept_with_area_box_and_crowd(root: Path, tmp_path: Path) -> None:
    convert_ctw1500(tmp_path / "train.json", root=root, split="train")
    coco = _load(tmp_path / "train.json")
    assert coco.dataset["categories"] == [{"id": 1, "name": "text", "supercategory": "text"}]
    assert [(i["file_name"], i["height"], i["width"]) for i in coco.dataset["images"]] == [
        ("0001.jpg", H, W), ("0002.jpg", H, W)]
    anns = coco.dataset["annotations"]
    assert [(a["iscrowd"], a["area"], a["bbox"]) for a in anns] == [(0, 208, [4, 4, 26, 8]),
                                                                    (1, 208, [34, 2, 26, 8])]
    assert anns[0]["segmentation"] == [[float(v) for v in _rect14(4, 4, 30, 12)]]  # the 14 points, as given
    for ann in anns:
        rle = coco.annToRLE(ann)
        assert int(mask_utils.area(rle)) == ann["area"] and mask_utils.toBbox(rle).tolist() == ann["bbox"]


def test_test_txt_variable_points_text_and_ignore(root: Path, tmp_path: Path) -> None:
    summary = convert_ctw1500(tmp_path / "test.json", root=root, split="test")
    assert summary["images"] == 2
    assert summary["instances_per_category"] == {"text": 2} and summary["crowd_per_category"] == {"text": 1}
    assert {r: e["files"] for r, e in summary["skipped"].items()} == {
        "polygon with an odd number of coordinates": ["0001002.txt: line 1"]}
    anns = _load(tmp_path / "test.json").dataset["annotations"]
    assert [(a["image_id"], a["iscrowd"], a["area"], a["bbox"], len(a["segmentation"][0])) for a in anns] == [
        (1, 0, 14 * 6, [2, 3, 14, 6], 32),  # 16 points
        (1, 1, 20 * 10, [30, 20, 20, 10], 28),
        (2, 0, 30 * 10, [10, 10, 30, 10], 28),
    ]


def test_sp_ray_loader_trains_on_the_json(root: Path, tmp_path: Path) -> None:
    convert_ctw1500(tmp_path / "train.json", root=root, split="train")
    dataset = CocoInstanceDataset(tmp_path / "train.json", root / "train_images")
    assert len(dataset) == 2 and not dataset.skipped and dataset.class_names == ["text"]
    _, target = dataset[0]
    assert target["masks"].shape == (1, H, W) and int(target["masks"].sum()) == 208


def test_overrides_and_wrong_folders(root: Path, tmp_path: Path) -> None:
    summary = convert_ctw1500(tmp_path / "o.json", images=root / "test_images", labels=root / "ctw1500_test_labels")
    assert summary["images"] == 2
    with pytest.raises(UserError, match=r"ROOT/train_images/\*.jpg with ROOT/ctw1500_train_labels/\*.xml"):
        convert_ctw1500(tmp_path / "o.json", root=tmp_path / "empty", split="train")
    (tmp_path / "empty" / "train_images").mkdir(parents=True)
    (tmp_path / "empty" / "train_labels").mkdir()
    with pytest.raises(UserError, match="no image file in"):
        convert_ctw1500(tmp_path / "o.json", root=tmp_path / "empty", split="train")
    with pytest.raises(UserError, match="train and test"):
        convert_ctw1500(tmp_path / "o.json", root=root, split="val")


def test_cli(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.json"
    assert main(["data", "convert", "--format", "ctw1500", "--root", str(root), "--split", "train",
                 "--out", str(out)]) in (0, None)
    printed = capsys.readouterr().out
    assert "ctw1500 train: 2 images, 2 annotations" in printed and "instances: text 1; crowd regions (iscrowd 1): 1" \
        in printed
    assert (tmp_path / "cli.summary.json").is_file()
    assert main(["data", "convert", "--format", "ctw1500", "--root", str(root), "--split", "train", "--out",
                 str(out), "--source", "polygons"]) == 2
    assert "--source is an option of --format cityscapes" in capsys.readouterr().err
