"""``sp-ray evaluate`` (checkpoint and ONNX) on validation data with bad entries: the dataset's skip rules
decide what is evaluated, nothing crashes, and the summary counts what was left out.

The trained tiny K-Net and its export are the session fixtures of tests/conftest.py.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from sp_ray.cli import main
from sp_ray.data.coco import DatasetSkipWarning
from sp_ray.evaluation.coco_eval import evaluate_checkpoint, evaluate_onnx


@pytest.fixture(scope="module")
def bad_val(tmp_path_factory, synthetic, write_bad_image) -> tuple[Path, Path]:
    """The val json plus a 2-point polygon on its first image, a truncated JPEG and a decompression bomb,
    each of the two with an annotation; the images linked into a folder of their own."""
    folder = tmp_path_factory.mktemp("bad_val")
    images = folder / "images"
    images.mkdir()
    for path in synthetic["images"].iterdir():
        (images / path.name).symlink_to(path)
    write_bad_image(images / "cut.jpg", "truncated_jpeg")
    write_bad_image(images / "bomb.png", "bomb_error")

    data = json.loads(synthetic["val"].read_text())
    first = data["images"][0]["id"]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    square = [[4, 4, 20, 4, 20, 20, 4, 20]]
    data["images"] += [{"id": 900, "file_name": "cut.jpg", "height": 64, "width": 64},
                       {"id": 901, "file_name": "bomb.png", "height": 20_000, "width": 20_000}]
    data["annotations"] += [
        {"id": next_id, "image_id": first, "category_id": data["categories"][0]["id"], "iscrowd": 0,
         "segmentation": [[1, 1, 5, 5]], "area": 0.0, "bbox": [1, 1, 4, 4]},  # crashed COCOeval before
        {"id": next_id + 1, "image_id": 900, "category_id": data["categories"][0]["id"], "iscrowd": 0,
         "segmentation": square, "area": 256.0, "bbox": [4, 4, 16, 16]},
        {"id": next_id + 2, "image_id": 901, "category_id": data["categories"][0]["id"], "iscrowd": 0,
         "segmentation": square, "area": 256.0, "bbox": [4, 4, 16, 16]},
    ]  # fmt: skip
    path = folder / "val_bad.json"
    path.write_text(json.dumps(data))
    return path, images


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetSkipWarning)
        return function(*args, **kwargs)


def test_evaluate_onnx_on_bad_data_equals_the_clean_data_and_counts_the_skips(
    knet_export, synthetic, bad_val, tmp_path, capsys
) -> None:
    path, images = bad_val
    clean, _ = _quiet(evaluate_onnx, str(knet_export.path), annotations=str(synthetic["val"]),
                      images=str(synthetic["images"]), providers=["CPUExecutionProvider"], threads=1)
    out = tmp_path / "metrics.json"
    with pytest.warns(DatasetSkipWarning, match=r"left out 2 images .* and 3 annotations"):
        code = main(["evaluate", "--onnx", str(knet_export.path), "--annotations", str(path),
                     "--images", str(images), "--out", str(out), "--threads", "1"])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["skipped"] == {"images": 2, "annotations": 3}  # the 2-point polygon, the two images' ones
    assert clean["skipped"] == {"images": 0, "annotations": 0}
    assert metrics["segm"] == clean["segm"] and metrics["bbox"] == clean["bbox"] and clean["segm"]["AP"] > 0
    printed = capsys.readouterr().out
    assert "not evaluated (bad data, skipped as in training): 2 images" in printed
    # Per category: pycocotools' summary AP is the mean over the categories with ground truth.
    val = json.loads(synthetic["val"].read_text())
    for iou_type in ("segm", "bbox"):
        rows = metrics["per_category"][iou_type]
        assert [row["id"] for row in rows] == sorted(c["id"] for c in val["categories"])
        assert sum(row["gt"] for row in rows) == sum(not a.get("iscrowd", 0) for a in val["annotations"])
        with_truth = [row["AP"] for row in rows if row["gt"]]
        assert sum(with_truth) / len(with_truth) == pytest.approx(metrics[iou_type]["AP"])
        assert f"{iou_type} category" in printed
    for name in ("pr_iou50", "pr_iou75"):
        png = Path(metrics["per_category"]["files"][name])
        assert png.parent == out.parent and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The predictions it wrote, read back by --predictions on the clean json, score as the clean evaluation.
    again = tmp_path / "again" / "metrics.json"
    assert main(["evaluate", "--predictions", str(out.with_name("predictions.json")), "--annotations",
                 str(synthetic["val"]), "--images", str(synthetic["images"]), "--out", str(again)]) == 0
    scored = json.loads(again.read_text())
    assert scored["segm"] == pytest.approx(clean["segm"]) and scored["bbox"] == pytest.approx(clean["bbox"])
    assert scored["per_category"]["segm"] == metrics["per_category"]["segm"]


def test_evaluate_checkpoint_on_bad_data_equals_the_clean_data(trained_knet, synthetic, bad_val) -> None:
    path, images = bad_val
    clean, _ = _quiet(evaluate_checkpoint, str(trained_knet), annotations=str(synthetic["val"]),
                      images=str(synthetic["images"]))
    metrics, results = _quiet(evaluate_checkpoint, str(trained_knet), annotations=str(path), images=str(images))
    assert metrics["skipped"] == {"images": 2, "annotations": 3}
    assert metrics["segm"] == clean["segm"] and metrics["bbox"] == clean["bbox"]
    val_ids = {image["id"] for image in json.loads(synthetic["val"].read_text())["images"]}
    assert {r["image_id"] for r in results} <= val_ids
