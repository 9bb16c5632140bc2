"""Predictions drawn on their image: masks blended in, boxes, class names and scores (numpy + PIL only).

Reuses the report's drawer (``sp_ray.drawing.draw``, torch-free) so a prediction looks the same in a
report and in ``sp-ray predict --overlays``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from export.rle import decode_rle
from export.runtime import Instances
from sp_ray.drawing.draw import draw_labels, instance_colors, overlay_masks


def draw_instances(image: np.ndarray, found: Instances, class_names: Sequence[str]) -> np.ndarray:
    """One image with its instances drawn.

    Args:
        image: uint8 [H, W, 3] RGB.
        found: the runtime's instances of this image, with ``rles`` (``rle=True``) or dense ``masks``.
        class_names: name of each contiguous label.

    Returns:
        uint8 [H, W, 3]: masks at half opacity with outlines, xyxy boxes and "name score" labels, in a
        palette colour per instance (by descending score).
    """
    if found.masks is not None:
        masks = found.masks
    elif found.rles:
        masks = np.stack([decode_rle(rle) for rle in found.rles])  # (K, H, W)
    else:
        masks = np.zeros((0, *image.shape[:2]), bool)
    colors = instance_colors(len(found))
    drawn = overlay_masks(image, masks, colors=colors) if len(found) else image.copy()
    canvas = Image.fromarray(drawn)
    pen = ImageDraw.Draw(canvas)
    for box, color in zip(found.boxes, colors, strict=True):
        x0, y0, x1, y1 = (float(v) for v in box)
        pen.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=tuple(int(c) for c in color), width=1)
    texts = [f"{class_names[int(label)]} {score:.2f}" for label, score in zip(found.labels, found.scores, strict=True)]
    anchors = [(float(box[0]), float(box[1])) for box in found.boxes]
    return draw_labels(np.asarray(canvas), anchors, texts, colors) if texts else np.asarray(canvas)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
