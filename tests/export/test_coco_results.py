"""export.coco_results: the COCO results entry that evaluation, predict and serve all write."""

from __future__ import annotations

import json

import numpy as np

from export.coco_results import coco_result


def test_one_instance_as_a_coco_results_entry() -> None:
    entry = coco_result(np.int64(7), np.float32(0.5), np.array([2.0, 3.0, 12.0, 8.0], np.float32),
                        {"size": np.array([20, 30]), "counts": b"abc"})
    assert entry == {"category_id": 7, "segmentation": {"size": [20, 30], "counts": "abc"},
                     "bbox": [2.0, 3.0, 10.0, 5.0], "score": 0.5}
    # Plain Python types only: the entry goes to JSON as it is.
    assert json.loads(json.dumps(entry)) == entry
    assert coco_result(1, 0.25, [0, 0, 1, 1], {"size": [1, 1], "counts": "01"})["segmentation"]["counts"] == "01"
