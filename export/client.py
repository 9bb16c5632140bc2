"""A client of ``sp-ray serve`` in numpy and the standard library alone (no torch, no onnxruntime, no Ray).

    from export.client import decode_prediction, post_image
    answer = post_image("http://127.0.0.1:8000", "photo.jpg", score_threshold=0.5)   # the JSON, as a dict
    found = decode_prediction(answer)
    found.masks            # bool [K, H, W], one per instance, at the image's size
    found.boxes            # float32 [K, 4] COCO xywh;  found.scores, found.category_ids, found.category_names

The masks are the service's COCO RLEs decoded by ``export.rle.decode_rle``, i.e. the runtime's own masks.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.rle import decode_rle


@dataclass
class ServedPrediction:
    """The instances of one image as the service found them, by descending score.

    Attributes:
        height: H of the image.
        width: W of the image.
        boxes: float32 [K, 4] COCO boxes (x, y, w, h) in pixels.
        scores: float32 [K].
        category_ids: int64 [K] COCO category ids.
        category_names: K names.
        masks: bool [K, H, W].
    """

    height: int
    width: int
    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    category_names: list[str]
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


INSTANCE_KEYS = ("category_id", "category_name", "score", "bbox", "segmentation")


def decode_prediction(answer: dict | str | bytes) -> ServedPrediction:
    """Arrays from a ``POST /predict`` answer (the parsed JSON, or its text).

    Raises:
        ValueError: the answer lacks a key or a mask does not match the image size; the message names it.
    """
    if isinstance(answer, (str, bytes)):
        answer = json.loads(answer)
    missing = [key for key in ("height", "width", "instances") if key not in answer]
    if missing:
        raise ValueError(f"not an sp-ray serve answer: it lacks {missing} (keys present: {sorted(answer)})")
    height, width, instances = int(answer["height"]), int(answer["width"]), answer["instances"]
    masks = np.zeros((len(instances), height, width), bool)
    for k, instance in enumerate(instances):
        absent = [key for key in INSTANCE_KEYS if key not in instance]
        if absent:
            raise ValueError(f"instance {k} of the answer lacks {absent}")
        if list(instance["segmentation"]["size"]) != [height, width]:
            raise ValueError(f"instance {k}: its mask is {instance['segmentation']['size']}, the image "
                             f"{[height, width]}")
        masks[k] = decode_rle(instance["segmentation"])
    return ServedPrediction(
        height=height, width=width,
        boxes=np.array([i["bbox"] for i in instances], np.float32).reshape(-1, 4),
        scores=np.array([i["score"] for i in instances], np.float32),
        category_ids=np.array([i["category_id"] for i in instances], np.int64),
        category_names=[i["category_name"] for i in instances],
        masks=masks,
    )


def post_image(url: str, image: str | os.PathLike | bytes, *, score_threshold: float | None = None,
               timeout: float = 60.0) -> dict:
    """``POST`` an image file (a path, or its bytes) to ``URL/predict``; returns the parsed JSON answer.

    Raises:
        RuntimeError: the service answered with an error status; the message holds its status and message.
    """
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    query = "" if score_threshold is None else "?" + urllib.parse.urlencode({"score_threshold": score_threshold})
    request = urllib.request.Request(url.rstrip("/") + "/predict" + query, data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        body = err.read().decode("utf-8", "replace")
        try:
            message = json.loads(body).get("error", body)
        except ValueError:
            message = body
        raise RuntimeError(f"{url}/predict answered {err.code}: {message}") from None
