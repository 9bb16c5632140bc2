"""COCO results entries from the runtime's output, in numpy alone: the one writer of evaluation, ``sp-ray
predict`` and ``sp-ray serve``, so every route out of a model writes the same fields the same way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def coco_result(category_id: int, score: float, box: Sequence[float], rle: Mapping[str, Any]) -> dict[str, Any]:
    """One instance as a COCO results entry, without its ``image_id``.

    Args:
        category_id: COCO category id.
        score: confidence in [0, 1].
        box: x0, y0, x1, y1 in pixels (written as COCO's x, y, w, h).
        rle: COCO compressed RLE {"size": [H, W], "counts": str or bytes}.

    Returns:
        {"category_id", "segmentation": {"size", "counts": str}, "bbox": [x, y, w, h], "score"}.
    """
    counts = rle["counts"]
    x0, y0, x1, y1 = (float(v) for v in box)
    return {
        "category_id": int(category_id),
        "segmentation": {"size": [int(v) for v in rle["size"]],
                         "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts)},
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "score": float(score),
    }
