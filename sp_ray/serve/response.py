"""The JSON body of a ``POST /predict`` answer, from the runtime's ``Instances`` (plain Python, numpy).

    {"height": H, "width": W,
     "instances": [{"category_id": 3, "category_name": "circle", "score": 0.91,
                    "bbox": [x, y, w, h],                       # COCO: pixels, top-left corner and size
                    "segmentation": {"size": [H, W], "counts": "..."}},   # COCO compressed RLE
                   ...]}                                         # by descending score

The instance fields are a COCO results entry (``export.coco_results.coco_result``, the writer of evaluation
and ``sp-ray predict`` too) without ``image_id``, plus ``category_name``; ``export.client`` reads them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from export.coco_results import coco_result
from export.runtime import Instances


def prediction_json(found: Instances, *, height: int, width: int, class_names: Sequence[str]) -> dict[str, Any]:
    """One image's instances as the service answers them.

    Args:
        found: the runtime's ``Instances`` with ``rles`` (``rle=True``): boxes float [K, 4] xyxy, scores [K],
            labels [K] contiguous, category_ids [K] COCO ids.
        height: H of the image as decoded.
        width: W of the image as decoded.
        class_names: category names by contiguous label (``Segmenter.class_names``).

    Returns:
        ``{"height", "width", "instances"}`` as in the module docstring.
    """
    if found.rles is None:
        raise ValueError("prediction_json needs the runtime's RLE output (predict with rle=True)")
    instances = [{**coco_result(cat_id, score, box, rle), "category_name": class_names[int(label)]}
                 for box, score, label, cat_id, rle in zip(found.boxes, found.scores, found.labels,
                                                           found.category_ids, found.rles, strict=True)]
    return {"height": int(height), "width": int(width), "instances": instances}
