"""COCO AP of ``sp-ray predict``'s output against a COCO json of the same files (driver side; imports torch
through the evaluation package, never inside an actor).

Predictions carry the ids of DIR/images.json; a ground-truth json has its own. The two are matched by
file: the json's ``images_root / file_name`` and images.json's ``path``, as absolute paths. The
evaluated set is the one ``sp-ray evaluate --onnx`` scores: the json's images that the dataset keeps
(``CocoInstanceDataset``'s rules), minus those predict skipped (undecodable), with the dataset's ground
truth; so predict's output scores exactly as ``evaluate --onnx`` on the same model and images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sp_ray.errors import UserError

_EXAMPLES = 3


def _absolute(path: str | os.PathLike) -> str:
    return os.path.abspath(path)


def score_predictions(out: str | os.PathLike, annotations: str | os.PathLike,
                      images_root: str | os.PathLike | None = None, *, per_category: bool = False) -> dict[str, Any]:
    """Score DIR/predictions.json against a COCO json.

    Args:
        out: the output folder of ``sp-ray predict``.
        annotations: COCO json of (some of) the predicted files.
        images_root: folder the json's file names are relative to (default: images.json's ``root``,
            the ``--source`` folder).
        per_category: add ``metrics["per_category"]`` ({iou type: ``CategoryScores``}, ``coco_metrics``).

    Returns:
        Metrics as ``sp-ray evaluate``: {"segm": {...}, "bbox": {...}, "skipped": {"images", "annotations"}}.

    Raises:
        UserError: DIR holds no predict output or a video's, or some images of the json were neither predicted nor
            skipped by predict (another folder; the message gives examples).
    """
    from sp_ray.data.coco import CocoInstanceDataset
    from sp_ray.evaluation.coco_eval import coco_metrics

    out = Path(out)
    try:
        listing = json.loads((out / "images.json").read_text())
        predictions = json.loads((out / "predictions.json").read_text())
        skipped = json.loads((out / "skipped.json").read_text())["skipped"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise UserError(f"{out} holds no complete 'sp-ray predict' output ({err}); run sp-ray predict first") from None
    if any("frame_index" in entry for entry in listing["images"]):
        raise UserError(f"{out} holds the frames of a video; scoring against a COCO json is for image sources")
    root = Path(images_root) if images_root is not None else Path(listing["root"])
    predicted = {_absolute(entry["path"]): entry["id"] for entry in listing["images"]}
    failed = {_absolute(entry["path"]) for entry in skipped}
    dataset = CocoInstanceDataset(annotations, root)
    to_truth: dict[int, int] = {}
    evaluated, left_out, missing = [], [], []
    for image_id in dataset.image_ids:
        path = _absolute(root / dataset.coco.imgs[image_id]["file_name"])
        if path in predicted:
            to_truth[predicted[path]] = image_id
            evaluated.append(image_id)
        elif path in failed:
            left_out.append(image_id)  # as evaluate --onnx leaves out an image that does not decode
        else:
            missing.append(path)
    if missing:
        raise UserError(f"{len(missing)} images of {annotations} are not in {out / 'images.json'} "
                        f"(e.g. {', '.join(missing[:_EXAMPLES])}); run sp-ray predict on the folder the json's "
                        "file names are relative to")
    results = [{key: value for key, value in {**r, "image_id": to_truth[r["image_id"]]}.items() if key != "frame_index"}
               for r in predictions if r["image_id"] in to_truth]
    metrics = coco_metrics(dataset.coco_ground_truth(evaluated), results, image_ids=evaluated,
                           per_category=per_category)
    lost = sum(len(dataset.coco.getAnnIds(imgIds=[image_id])) for image_id in left_out)
    metrics["skipped"] = {"images": sum(dataset.skipped_images.values()) + len(left_out),
                          "annotations": sum(dataset.skipped_annotations.values()) + lost}
    return metrics
