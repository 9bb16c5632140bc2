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
