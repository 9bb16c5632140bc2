import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO

from sp_ray.evaluation.coco_eval import METRIC_NAMES, coco_metrics, format_metrics, instances_to_coco


def make_gt(tmp_path):
    """Two images, two categories, one crowd region; masks at three COCO scales."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    ann_id = 1
    for image_id in (1, 2):
        h, w = 200, 240
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for side, cat in ((20, 1), (60, 2), (120, 1)):
            m = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h - side), rng.integers(0, w - side)
            m[y:y + side, x:x + side] = 1
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                         "segmentation": rle, "area": float(m.sum()),
                         "bbox": [float(x), float(y), float(side), float(side)]})
            ann_id += 1
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return COCO(str(path))


def gt_as_predictions(coco):
    results = []
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        masks = np.stack([coco.annToMask(a) for a in anns]).astype(bool)
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns])
        labels = np.array([a["category_id"] - 1 for a in anns])
        results += instances_to_coco(image_id, np.ones(len(anns)), labels, masks, boxes, cat_ids=[1, 2])
    return results


def test_ground_truth_as_predictions_scores_100(tmp_path):
    coco = make_gt(tmp_path)
    metrics = coco_metrics(coco, gt_as_predictions(coco))
    for iou_type in ("segm", "bbox"):
        for name in METRIC_NAMES:
            assert metrics[iou_type][name] == pytest.approx(100.0), (iou_type, name)
    assert "segm" in format_metrics(metrics)


def test_wrong_category_scores_0_and_shifted_masks_lower_ap(tmp_path):
    coco = make_gt(tmp_path)
    results = gt_as_predictions(coco)
    swapped = [{**r, "category_id": 3 - r["category_id"]} for r in results]
    assert coco_metrics(coco, swapped, iou_types=("segm",))["segm"]["AP"] == pytest.approx(0.0)
    half = [r for i, r in enumerate(results) if i % 2 == 0]
    ap = coco_metrics(coco, half, iou_types=("segm",))["segm"]["AP"]
    assert 0.0 < ap < 100.0


def test_rle_round_trip_and_empty_input(tmp_path):
    masks = np.zeros((2, 5, 7), bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 4, 0] = True
    out = instances_to_coco(9, np.array([0.9, 0.1]), np.array([1, 0]), masks,
                            np.array([[2, 1, 6, 3], [0, 4, 1, 5]], float), cat_ids=[5, 7])
    assert [r["category_id"] for r in out] == [7, 5]
    assert out[0]["bbox"] == [2.0, 1.0, 4.0, 2.0]
    assert isinstance(out[0]["segmentation"]["counts"], str)
    decoded = mask_util.decode({**out[0]["segmentation"], "counts": out[0]["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), masks[0])
    assert instances_to_coco(1, np.zeros(0), np.zeros(0), np.zeros((0, 5, 7), bool), np.zeros((0, 4)), [1]) == []
    coco = make_gt(tmp_path)
    assert coco_metrics(coco, [])["segm"]["AP"] == 0.0


def _bad_data(tmp_path, write_bad_image, *, degenerate=True, truncated=False):
    """Two or three 40 x 48 images with one square each (plus a crowd region); optionally a 2-point polygon
    on image 1 and a third image whose JPEG is truncated (its header reads)."""
    from PIL import Image

    images, anns = [], []
    for image_id in (1, 2):
        Image.fromarray(np.full((40, 48, 3), 90 * image_id, np.uint8)).save(tmp_path / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 40, "width": 48})
        x = 4 + 10 * image_id
        anns.append({"id": image_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": 144.0,
                     "segmentation": [[x, 5, x + 12, 5, x + 12, 17, x, 17]], "bbox": [x, 5, 12, 12]})
    anns.append({"id": 10, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": 64.0, "bbox": [30, 30, 8, 8],
                 "segmentation": [[30, 30, 38, 30, 38, 38, 30, 38]]})
    if degenerate:
        anns.append({"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 0.0, "bbox": [1, 1, 4, 4],
                     "segmentation": [[1, 1, 5, 5]]})  # two points: pycocotools reads it as a box and fails
    if truncated:
        write_bad_image(tmp_path / "3.jpg", "truncated_jpeg")
        images.append({"id": 3, "file_name": "3.jpg", "height": 64, "width": 64})
        anns.append({"id": 12, "image_id": 3, "category_id": 1, "iscrowd": 0, "area": 100.0, "bbox": [2, 2, 10, 10],
                     "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]})
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    return path


def _perfect_predictions(path, image_ids):
    """The non-crowd squares of ``image_ids`` as predictions, rasterised here from the raw json (score 1)."""
    data = json.loads(path.read_text())
    results = []
    for ann in data["annotations"]:
        if ann["image_id"] in image_ids and not ann["iscrowd"] and len(ann["segmentation"][0]) >= 6:
            x, y, w, h = ann["bbox"]
            mask = np.zeros((40, 48), np.uint8)
            mask[int(y):int(y + h), int(x):int(x + w)] = 1
            rle = mask_util.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": ann["image_id"], "category_id": 1, "segmentation": rle,
                            "bbox": [x, y, w, h], "score": 1.0})
    return results


def test_a_degenerate_polygon_is_left_out_of_the_ground_truth_as_in_training(tmp_path, write_bad_image):
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    from sp_ray.data.coco import CocoInstanceDataset, DatasetSkipWarning
    from sp_ray.evaluation.coco_eval import evaluation_ground_truth

    path = _bad_data(tmp_path, write_bad_image)
    predictions = _perfect_predictions(path, {1, 2})
    with contextlib.redirect_stdout(io.StringIO()):  # the failure being fixed: COCOeval on the raw json
        raw = COCO(str(path))
        evaluator = COCOeval(raw, raw.loadRes(predictions), iouType="segm")
        with pytest.raises(TypeError, match="bb"):
            evaluator.evaluate()
    with pytest.warns(DatasetSkipWarning):
        dataset = CocoInstanceDataset(path, tmp_path)
    with pytest.warns(DatasetSkipWarning, match=r"2 images evaluated; left out 0 images .* and 1 annotations "
                                                 r"\(empty or degenerate segmentation: 1\)"):
        ground_truth, image_ids, skipped = evaluation_ground_truth(dataset)
    assert image_ids == [1, 2] and skipped == {"images": 0, "annotations": 1}
    assert sorted(ground_truth.getAnnIds()) == [1, 2, 10]  # the crowd region stays: COCOeval ignores matches on it
    metrics = coco_metrics(ground_truth, predictions, image_ids=image_ids)
    assert metrics["segm"]["AP"] == pytest.approx(100.0) and metrics["bbox"]["AP"] == pytest.approx(100.0)
    table = format_metrics({**metrics, "skipped": skipped})
    assert "not evaluated (bad data, skipped as in training): 0 images with their ground truth, 1 annotations" in table


def test_an_image_that_does_not_decode_is_dropped_from_the_evaluated_set(tmp_path, write_bad_image):
    """Its objects are not counted as missed: AP is that of the images the model saw, and the summary says so."""
    from sp_ray.data.coco import CocoInstanceDataset, DatasetSkipWarning
    from sp_ray.data.images import UnusableImageError
    from sp_ray.evaluation.coco_eval import evaluation_ground_truth

    path = _bad_data(tmp_path, write_bad_image, degenerate=False, truncated=True)
    dataset = CocoInstanceDataset(path, tmp_path)
    assert dataset.image_ids == [1, 2, 3]
    read = []
    with pytest.warns(DatasetSkipWarning, match="3.jpg"):
        for index in range(len(dataset)):  # what the prediction loops do
            try:
                dataset.read_image(index)
            except UnusableImageError:
                continue
            read.append(dataset.image_ids[index])
    assert read == [1, 2]
    predictions = _perfect_predictions(path, {1, 2})
    with pytest.warns(DatasetSkipWarning, match=r"left out 1 images .*missing or unreadable image file: 1"):
        ground_truth, image_ids, skipped = evaluation_ground_truth(dataset)
    assert image_ids == [1, 2] and skipped == {"images": 1, "annotations": 1}
    assert coco_metrics(ground_truth, predictions, image_ids=image_ids)["segm"]["AP"] == pytest.approx(100.0)
    # Counting the unseen image's object as missed would cap the recall at 2 of 3.
    counted = dataset.coco_ground_truth([1, 2, 3])
    assert coco_metrics(counted, predictions, image_ids=[1, 2, 3])["segm"]["AP"] < 70.0
