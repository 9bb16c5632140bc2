"""Per-category AP on a ground truth whose per-category AP is known by construction, checked against the hand
values and against pycocotools' own summary AP (the mean over the categories with ground truth); then
``sp-ray evaluate --predictions FILE`` end to end through ``main``.

The construction (two 100 x 100 images, 40 x 40 squares):

- alpha: one square on each image, predicted exactly -> AP = AP50 = AP75 = 100 (segm and bbox); a crowd
  region of alpha on image 2 is an ignore region, not a missed object;
- beta: one square on image 1, predicted shifted right by 9 px -> IoU 31/49 = 0.633 for mask and box, a
  match at IoU 0.50, 0.55 and 0.60 of the ten thresholds: AP = 30, AP50 = 100, AP75 = 0;
- gamma: one square on image 2, not predicted -> AP 0;
- delta: no ground truth, one prediction -> no AP (None), not 0.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image
from pycocotools.coco import COCO

from sp_ray.cli import main
from sp_ray.evaluation.coco_eval import coco_metrics

SIZE = 100
SIDE = 40
SHIFT = 9
CATEGORIES = [{"id": 1, "name": "alpha"}, {"id": 2, "name": "beta"}, {"id": 3, "name": "gamma"},
              {"id": 4, "name": "delta"}]
# (image id, category id, x, y, iscrowd)
GROUND_TRUTH = [(1, 1, 5, 5, 0), (2, 1, 50, 50, 0), (1, 2, 10, 55, 0), (2, 3, 5, 5, 0), (2, 1, 0, 55, 1)]
# category id -> (AP, AP50, AP75, gt, crowd, pred), by construction (see the module docstring)
EXPECTED = {1: (100.0, 100.0, 100.0, 2, 1, 2), 2: (30.0, 100.0, 0.0, 1, 0, 1), 3: (0.0, 0.0, 0.0, 1, 0, 0),
            4: (None, None, None, 0, 0, 1)}


def square_rle(x: int, y: int) -> dict:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y:y + SIDE, x:x + SIDE] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def square_polygon(x: int, y: int) -> list[list[float]]:
    # pycocotools rasterizes a polygon's pixel-corner path to the pixels inside it: this covers x..x+SIDE-1.
    x0, y0, x1, y1 = x, y, x + SIDE, y + SIDE
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def ground_truth_json() -> dict:
    images = [{"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE} for i in (1, 2)]
    annotations = [{"id": n, "image_id": image, "category_id": cat, "iscrowd": crowd, "segmentation": square_rle(x, y),
                    "area": float(SIDE * SIDE), "bbox": [float(x), float(y), float(SIDE), float(SIDE)]}
                   for n, (image, cat, x, y, crowd) in enumerate(GROUND_TRUTH, start=1)]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def predictions(*, masks: bool = True, boxes: bool = True) -> list[dict]:
    # (image id, category id, x, y, score)
    made = [(1, 1, 5, 5, 0.9), (2, 1, 50, 50, 0.8), (1, 2, 10 + SHIFT, 55, 0.7), (1, 4, 60, 5, 0.6)]
    entries = []
    for image, cat, x, y, score in made:
        entry = {"image_id": image, "category_id": cat, "score": score}
        if masks:
            entry["segmentation"] = square_rle(x, y)
        if boxes:
            entry["bbox"] = [float(x), float(y), float(SIDE), float(SIDE)]
        entries.append(entry)
    return entries


def load_coco(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def hand_rows() -> list[dict]:
    return [{"id": c["id"], "name": c["name"], **dict(zip(("AP", "AP50", "AP75", "gt", "crowd", "pred"),
                                                          EXPECTED[c["id"]], strict=True))} for c in CATEGORIES]


def approx_rows(rows: list[dict]) -> list[dict]:
    return [{key: pytest.approx(value) if isinstance(value, float) else value for key, value in row.items()}
            for row in rows]


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_per_category_ap_equals_the_construction_and_averages_to_the_summary(iou_type) -> None:
    metrics = coco_metrics(load_coco(ground_truth_json()), predictions(), iou_types=(iou_type,), per_category=True)
    scores = metrics["per_category"][iou_type]
    rows = [vars(row) for row in scores.rows]
    assert rows == approx_rows(hand_rows())
    with_truth = [row.AP for row in scores.rows if row.gt]
    assert np.mean(with_truth) == pytest.approx(metrics[iou_type]["AP"]) == pytest.approx(130.0 / 3)
    assert np.mean([row.AP50 for row in scores.rows if row.gt]) == pytest.approx(metrics[iou_type]["AP50"])
    assert np.mean([row.AP75 for row in scores.rows if row.gt]) == pytest.approx(metrics[iou_type]["AP75"])
    # The curves: alpha precise at every recall; beta precise at IoU 0.5 and never at 0.75; no curve for delta.
    assert set(scores.precision[0.5]) == {1, 2, 3}
    assert scores.precision[0.5][1] == pytest.approx([1.0] * 101)
    assert scores.precision[0.5][2] == pytest.approx([1.0] * 101)
    assert scores.precision[0.75][2] == pytest.approx([0.0] * 101)
    assert scores.mean_precision(0.75) == pytest.approx([1.0 / 3] * 101)


def test_no_predictions_gives_0_for_categories_with_ground_truth_and_none_without() -> None:
    metrics = coco_metrics(load_coco(ground_truth_json()), [], per_category=True)
    for iou_type in ("segm", "bbox"):
        aps = {row.id: row.AP for row in metrics["per_category"][iou_type].rows}
        assert aps == {1: 0.0, 2: 0.0, 3: 0.0, 4: None}


@pytest.fixture
def dataset(tmp_path) -> dict[str, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for image_id in (1, 2):
        Image.new("RGB", (SIZE, SIZE), (90, 90, 90)).save(images / f"{image_id}.png")
    annotations = tmp_path / "gt.json"
    annotations.write_text(json.dumps(ground_truth_json()))
    return {"annotations": annotations, "images": images, "root": tmp_path}


def evaluate(dataset: dict[str, Path], entries, capsys, *extra: str) -> tuple[int, str, str, Path]:
    path = dataset["root"] / "preds.json"
    path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    out = dataset["root"] / "eval" / "metrics.json"
    code = main(["evaluate", "--predictions", str(path), "--annotations", str(dataset["annotations"]),
                 "--images", str(dataset["images"]), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out


def is_png(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    width, height = struct.unpack(">II", data[16:24])
    with Image.open(path) as image:
        image.verify()
    return width, height


def test_evaluate_predictions_file_prints_and_writes_the_per_category_table(dataset, capsys) -> None:
    code, out, err, metrics_path = evaluate(dataset, predictions(), capsys)
    assert code == 0, err
    metrics = json.loads(metrics_path.read_text())
    for iou_type in ("segm", "bbox"):
        assert metrics[iou_type]["AP"] == pytest.approx(130.0 / 3)
        assert metrics["per_category"][iou_type] == approx_rows(hand_rows())
    assert metrics["skipped"] == {"images": 0, "annotations": 0, "predictions": 0}
    files = metrics["per_category"]["files"]
    assert set(files) == {"table", "pr_iou50", "pr_iou75"}
    for name in ("pr_iou50", "pr_iou75"):
        assert Path(files[name]).parent == metrics_path.parent
        width, height = is_png(files[name])
        assert width > height > 100
    table = Path(files["table"]).read_text()
    assert "| 2 | beta | 30.00 | 100.00 | 0.00 | 1 | 0 | 1 |" in table
    assert "| 4 | delta | - | - | - | 0 | 0 | 1 |" in table
    lines = out.splitlines()
    assert any(line.split() == ["2", "beta", "30.00", "100.00", "0.00", "1", "0", "1"] for line in lines)
    assert any(line.split() == ["4", "delta", "-", "-", "-", "0", "0", "1"] for line in lines)
    assert any(line.split()[:3] == ["id", "segm", "category"] for line in lines)
    assert any(line.split()[:3] == ["id", "bbox", "category"] for line in lines)


def test_polygons_and_uncompressed_rle_score_as_compressed_rle(dataset, capsys) -> None:
    """Polygon segmentations and uncompressed RLE (counts a list) are read as masks of their image."""
    entries = predictions()
    entries[0]["segmentation"] = square_polygon(5, 5)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[50:50 + SIDE, 50:50 + SIDE] = 1
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    entries[1]["segmentation"] = {"size": [SIZE, SIZE], "counts": runs}  # starts with a run of 0s
    code, _, err, metrics_path = evaluate(dataset, entries, capsys)
    assert code == 0, err
    rows = json.loads(metrics_path.read_text())["per_category"]["segm"]
    assert rows[0]["AP"] == pytest.approx(100.0)


def test_bbox_only_predictions_have_bbox_ap_and_no_segm(dataset, capsys) -> None:
    code, out, err, metrics_path = evaluate(dataset, predictions(masks=False), capsys)
    assert code == 0, err
    metrics = json.loads(metrics_path.read_text())
    assert "segm" not in metrics and metrics["per_category"]["segm"] is None
    assert metrics["bbox"]["AP"] == pytest.approx(130.0 / 3)
    assert metrics["per_category"]["bbox"] == approx_rows(hand_rows())
    assert "segm per category: absent (no prediction has a segmentation)" in out
    is_png(metrics["per_category"]["files"]["pr_iou75"])


def test_entries_without_a_mask_count_for_bbox_only(dataset, capsys, caplog) -> None:
    """beta's prediction without its mask: bbox AP as constructed, segm counts beta as not predicted."""
    entries = predictions()
    del entries[2]["segmentation"]
    code, _, err, metrics_path = evaluate(dataset, entries, capsys)
    assert code == 0, err
    per_category = json.loads(metrics_path.read_text())["per_category"]
    assert per_category["bbox"] == approx_rows(hand_rows())
    beta = per_category["segm"][1]
    assert (beta["name"], beta["AP"], beta["AP50"], beta["pred"]) == ("beta", 0.0, 0.0, 0)
    assert "1 of 4 evaluated entries have no segmentation" in caplog.text


def test_entries_on_unknown_images_are_skipped_and_counted(dataset, capsys) -> None:
    entries = [*predictions(), {"image_id": 77, "category_id": 1, "score": 0.5, "bbox": [0.0, 0.0, 5.0, 5.0]}]
    with pytest.warns(UserWarning, match=r"skipped 1 of 5 entries \(image_id not in --annotations: 1\)"):
        code, out, err, metrics_path = evaluate(dataset, entries, capsys)
    assert code == 0, err
    metrics = json.loads(metrics_path.read_text())
    assert metrics["skipped"]["predictions"] == 1 and metrics["segm"]["AP"] == pytest.approx(130.0 / 3)
    assert "predictions not evaluated (not on an evaluated image): 1" in out


@pytest.mark.parametrize(("entries", "message"), [
    ("{not json", "is not json"),
    ({"images": [], "annotations": []}, "holds a dict, not a list of results (a COCO ground-truth json?"),
    ([], "is an empty list"),
    ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}], "entry 0 has no score"),
    ([{"image_id": "1.png", "category_id": 1, "score": 0.5, "bbox": [0, 0, 4, 4]}],
     "entry 0 has image_id '1.png', not an int"),
    ([{"image_id": 1, "category_id": 1, "score": 0.5}], "entry 0 has neither a segmentation nor a bbox"),
    ([{"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [0, 0, 4]}], "entry 0 has bbox [0, 0, 4], not"),
    ([{"image_id": 1, "category_id": 0, "score": 0.5, "bbox": [0, 0, 4, 4]}], "has category ids [0] that"),
    ([{"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": {"size": [50, 50], "counts": "PP"}}],
     "entry 0 (image_id 1, 100x100) has an unusable segmentation"),
    ([{"image_id": 9, "category_id": 1, "score": 0.5, "bbox": [0, 0, 4, 4]}], "no entry of --predictions"),
])  # fmt: skip
def test_a_bad_predictions_file_is_a_clear_error(dataset, capsys, entries, message) -> None:
    code, _, err, metrics_path = evaluate(dataset, entries, capsys)
    assert code == 2 and message in err, err
    assert not metrics_path.exists()


def test_write_predictions_is_for_a_model(dataset, capsys) -> None:
    code, _, err, _ = evaluate(dataset, predictions(), capsys, "--write-predictions", "x.json")
    assert code == 2 and "--write-predictions applies to --checkpoint / --onnx" in err
