"""COCO AP of a COCO results json written by another tool (detectron2, mmdet, ...): ``sp-ray evaluate --predictions``.

A results file is a json list of {"image_id", "category_id", "score", "segmentation" and/or "bbox"}; a
segmentation is a compressed RLE (``counts`` a str, or bytes through the Python API), an uncompressed RLE
(``counts`` a list of ints) or a list of polygons; a bbox is [x, y, width, height]. The evaluated set is the
one ``sp-ray evaluate --onnx`` scores: the images of --annotations that the dataset keeps
(``CocoInstanceDataset``'s rules), with the dataset's ground truth. The images are not decoded (the
dataset reads their headers): an image that passes its header check but does not decode is evaluated, and
without a prediction on it its objects count as missed, where ``--onnx`` leaves it out.

What is an error (the file is not what it claims to be, nothing is evaluated) and what is a counted skip
(the entry is fine but outside the evaluated set):

- error: not json, not a list, an empty list, an entry that is not an object, lacks image_id, category_id
  or score, or has neither a segmentation nor a bbox, an id that is not an int, a score that is not a finite
  number, a bbox that is not 4 finite numbers with width and height >= 0, a segmentation that is malformed
  or sized for another image size, a category id that --annotations does not define (a label/id mix-up,
  which skipping would hide), or no entry on an image of --annotations at all (another data set);
- skip, counted by reason: an entry on an image that --annotations does not list, or on an image the dataset
  leaves out (missing, unreadable, of another size than its json entry, too large).

An entry with only a bbox counts for bbox AP only; a file without any segmentation gets no segm AP at all
(absent, not 0). An entry with only a segmentation gets its mask's tight box for bbox AP (as pycocotools'
``loadRes`` does).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pycocotools.mask as mask_util

from sp_ray.data.coco import CocoInstanceDataset, DatasetSkipWarning, segmentation_rle
from sp_ray.errors import UserError
from sp_ray.evaluation.coco_eval import IOU_TYPES, score_results

log = logging.getLogger("sp_ray")

NOT_IN_ANNOTATIONS = "image_id not in --annotations"
ON_LEFT_OUT_IMAGE = "on an image the dataset leaves out"
_REQUIRED = ("image_id", "category_id", "score")
_EXAMPLE_IDS = 5


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_results_file(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a COCO results json, each checked for its keys and their types (not yet for ids).

    Raises:
        UserError: the file is missing, not json, not a non-empty list, or an entry is malformed; the message
            names the file, the entry's index and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--predictions {path} does not exist; pass a COCO results json (a list of "
                        "{image_id, category_id, score, segmentation, bbox})")
    try:
        entries = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--predictions {path} is not json ({err}); pass a COCO results json") from None
    if not isinstance(entries, list):
        hint = " (a COCO ground-truth json? pass it as --annotations)" if isinstance(entries, dict) and \
            "annotations" in entries else ""
        raise UserError(f"--predictions {path} holds a {type(entries).__name__}, not a list of results{hint}; "
                        "a COCO results json is a list of {image_id, category_id, score, segmentation, bbox}")
    if not entries:
        raise UserError(f"--predictions {path} is an empty list: there is nothing to evaluate")
    for index, entry in enumerate(entries):
        problem = _entry_problem(entry)
        if problem is not None:
            raise UserError(f"--predictions {path}: entry {index} {problem}; fix the file or the tool that wrote it")
    return entries


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    missing = [key for key in _REQUIRED if key not in entry]
    if missing:
        return f"has no {', '.join(missing)} (its keys: {', '.join(map(str, entry)) or 'none'})"
    for key in ("image_id", "category_id"):
        if not _is_int(entry[key]):
            return f"has {key} {entry[key]!r}, not an int"
    if not _is_number(entry["score"]):
        return f"has score {entry['score']!r}, not a finite number"
    if "segmentation" not in entry and "bbox" not in entry:
        return "has neither a segmentation nor a bbox"
    box = entry.get("bbox")
    if "bbox" in entry and not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)
                                and box[2] >= 0 and box[3] >= 0):
        return f"has bbox {box!r}, not [x, y, width, height] with width and height >= 0"
    return None


def _mask_rle(entry: dict[str, Any], image: dict[str, Any]) -> dict[str, Any]:
    rle = segmentation_rle(entry["segmentation"], image["height"], image["width"])
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def split_results(
    entries: list[dict[str, Any]], dataset: CocoInstanceDataset, *, source: str
) -> tuple[dict[str, list[dict[str, Any]] | None], Counter[str]]:
    """The entries on the dataset's kept images as results per IoU type, and the entries skipped by reason.

    Args:
        entries: what ``read_results_file`` returned.
        dataset: the dataset of --annotations / --images.
        source: the file's name, for the messages.

    Returns:
        ({"segm": results with a compressed RLE (None when no entry has a segmentation), "bbox": results with
        an xywh box}, Counter of skip reason -> entries).

    Raises:
        UserError: an unknown category id, a segmentation that does not fit its image, or no entry on an image
            of the annotations.
    """
    known_categories = set(dataset.cat_ids)
    unknown = sorted({e["category_id"] for e in entries} - known_categories)
    if unknown:
        raise UserError(
            f"--predictions {source} has category ids {unknown[:_EXAMPLE_IDS]} that --annotations "
            f"{dataset.annotations_path} does not define (it has {sorted(known_categories)[:20]}); a tool that "
            "writes contiguous labels needs them mapped to the json's category ids"
        )
    kept = set(dataset.image_ids)
    skipped: Counter[str] = Counter()
    segm: list[dict[str, Any]] = []
    bbox: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        image = dataset.coco.imgs.get(entry["image_id"])
        if image is None:
            skipped[NOT_IN_ANNOTATIONS] += 1
            continue
        if entry["image_id"] not in kept:
            skipped[ON_LEFT_OUT_IMAGE] += 1
            continue
        base = {"image_id": entry["image_id"], "category_id": entry["category_id"], "score": float(entry["score"])}
        box = [float(v) for v in entry["bbox"]] if "bbox" in entry else None
        if "segmentation" in entry:
            try:
                rle = _mask_rle(entry, image)
            except ValueError as err:
                raise UserError(
                    f"--predictions {source}: entry {index} (image_id {entry['image_id']}, "
                    f"{image['height']}x{image['width']}) has an unusable segmentation: {err}; masks must be "
                    "at the original image size"
                ) from None
            if box is None:
                box = [float(v) for v in mask_util.toBbox(rle)]
            segm.append({**base, "segmentation": rle, "bbox": box})
        bbox.append({**base, "bbox": box})
    if not bbox:
        raise UserError(
            f"no entry of --predictions {source} is on an image of --annotations {dataset.annotations_path} "
            f"that the dataset keeps ({dict(skipped)}); pass the annotations the predictions were made for"
        )
    return {"segm": segm or None, "bbox": bbox}, skipped


def evaluate_results_file(
    path: str | Path, *, annotations: str | Path, images: str | Path, per_category: bool = False,
) -> tuple[dict[str, Any], dict[str, int]]:
    """COCO AP of a results json against --annotations (see the module docstring for what is checked).

    Args:
        path: the results json.
        annotations: COCO ground-truth json.
        images: its image folder (the dataset's rules read the image headers).
        per_category: add ``metrics["per_category"]`` ({iou type: ``CategoryScores``}).

    Returns:
        (metrics as ``sp-ray evaluate``: {"segm": ..., "bbox": ..., "skipped": {...}} where "segm" is absent
        when no entry has a segmentation, and the skipped entries by reason).
    """
    entries = read_results_file(path)
    dataset = CocoInstanceDataset(annotations, images)
    by_type, skipped = split_results(entries, dataset, source=str(path))
    if skipped:
        warnings.warn(f"--predictions {path}: skipped {sum(skipped.values())} of {len(entries)} entries ("
                      + "; ".join(f"{reason}: {count}" for reason, count in skipped.most_common()) + ")",
                      DatasetSkipWarning, stacklevel=2)
    if by_type["segm"] is not None and len(by_type["segm"]) < len(by_type["bbox"]):
        log.warning("--predictions %s: %d of %d evaluated entries have no segmentation; they count for bbox AP "
                    "only", path, len(by_type["bbox"]) - len(by_type["segm"]), len(by_type["bbox"]))
    image_ids = dataset.image_ids
    evaluated = {iou_type: results for iou_type in IOU_TYPES if (results := by_type[iou_type]) is not None}
    summary, scores = score_results(dataset.coco_ground_truth(image_ids), evaluated, image_ids=image_ids)
    metrics: dict[str, Any] = {**summary, "skipped": {
        "images": sum(dataset.skipped_images.values()), "annotations": sum(dataset.skipped_annotations.values()),
        "predictions": sum(skipped.values()),
    }}
    if per_category:
        metrics["per_category"] = {iou_type: scores.get(iou_type) for iou_type in IOU_TYPES}
    return metrics, dict(skipped)
