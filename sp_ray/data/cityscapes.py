"""Cityscapes fine annotations -> COCO instances of the 8 classes of the Cityscapes instance benchmark.

The official layout under ``root``::

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png    (int32 ids, from createInstanceImage)
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_polygons.json

The classes are those ``cityscapesscripts.helpers.labels`` marks ``hasInstances`` and not ``ignoreInEval``
(person, rider, car, truck, bus, train, motorcycle, bicycle; caravan and trailer have instances but are not
evaluated), with their Cityscapes label ids (24..33) as COCO category ids.

Which annotation source is read (``source``):

- ``"auto"`` (default): an image's ``*_gtFine_instanceIds.png`` when it exists, else its ``*_gtFine_polygons.json``.
  The PNG comes first because it is the ground truth the official instance evaluation
  (``evalInstanceLevelSemanticLabeling``) reads; the polygons give the same masks when rendered.
- ``"instance-ids"``: the PNGs only (an image without one is counted as without annotation).
- ``"polygons"``: the JSON files only. They are rendered with cityscapesscripts' own
  ``json2instanceImg.createInstanceImage`` (objects drawn in file order, later ones occluding earlier ones,
  ``deleted`` objects left out), so they yield the instanceIds the official scripts would write.

An instanceIds pixel ``v >= 1000`` is instance ``v % 1000`` of label ``v // 1000``; a pixel equal to a thing
class's label id (``v < 1000``) belongs to a group region (a "cargroup" or "persongroup" polygon): each such
region becomes one ``iscrowd: 1`` annotation of its class, which COCOeval treats as an ignore region and sp-ray
does not train on. Masks are compressed COCO RLE; ``area`` and ``bbox`` are the RLE's. ``file_name`` is relative
to ``leftImg8bit/<split>`` (``aachen/aachen_000000_000019_leftImg8bit.png``): pass that folder as the images dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.helpers.labels import labels, name2label
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from PIL import Image

from export.geometry import MAX_IMAGE_PIXELS
from sp_ray.data.conversion import (
    ANNOTATION_WITHOUT_IMAGE,
    BAD_NUMBER,
    IMAGE_WITHOUT_ANNOTATION,
    MALFORMED_ANNOTATION,
    SIZE_MISMATCH,
    TOO_FEW_POINTS,
    ConversionReport,
    mask_annotation,
    write_conversion,
)
from sp_ray.data.images import UnusableImageError, displayed_size
from sp_ray.errors import UserError

SPLITS = ("train", "val")
SOURCES = ("auto", "instance-ids", "polygons")
IMAGE_SUFFIX = "_leftImg8bit.png"
INSTANCE_IDS_SUFFIX = "_gtFine_instanceIds.png"
POLYGONS_SUFFIX = "_gtFine_polygons.json"
UNKNOWN_LABEL = "polygon with a label Cityscapes does not define"
MALFORMED_OBJECT = "object without a string label or a polygon of (x, y) points"

# The instance benchmark's classes, from the package's table: person, rider, car, truck, bus, train,
# motorcycle, bicycle.
EVAL_LABELS = [label for label in labels if label.hasInstances and not label.ignoreInEval]
CATEGORIES = [{"id": label.id, "name": label.name, "supercategory": label.category} for label in EVAL_LABELS]

LAYOUT = (
    "ROOT/leftImg8bit/<split>/<city>/*_leftImg8bit.png and ROOT/gtFine/<split>/<city>/*_gtFine_instanceIds.png "
    "or *_gtFine_polygons.json (the official leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip unpacked "
    "into ROOT)"
)


def convert_cityscapes(
    root: str | Path, split: str, out: str | Path, *, source: str = "auto", max_image_pixels: int = MAX_IMAGE_PIXELS
) -> dict[str, Any]:
    """Convert one split of Cityscapes' fine annotations to a COCO instance json (see the module docstring).

    Args:
        root: the folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"`` or ``"val"`` (the test split's annotations are not public).
        out: the COCO json to write; ``<out stem>.summary.json`` gets the counts and the skipped files.
        source: ``"auto"``, ``"instance-ids"`` or ``"polygons"``.
        max_image_pixels: images with more pixels are skipped (sp-ray's reader limit).

    Returns:
        the summary (also written): images, annotations, instances and crowd regions per class, images without
        instances, images read from each source, and every skip under its reason with the file or object name.

    Raises:
        UserError: ``split`` or ``source`` is unknown, the root lacks the layout, or no image could be converted.
    """
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: Cityscapes instance annotations exist for {' and '.join(SPLITS)}")
    if source not in SOURCES:
        raise UserError(f"--source {source!r}: choose one of {', '.join(SOURCES)}")
    root = Path(root)
    images_dir, annotations_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise UserError(f"Cityscapes root {root}: {folder} is not a folder; expected {LAYOUT}")
    image_files = _by_key(images_dir, IMAGE_SUFFIX)
    instance_files = _by_key(annotations_dir, INSTANCE_IDS_SUFFIX) if source != "polygons" else {}
    polygon_files = _by_key(annotations_dir, POLYGONS_SUFFIX) if source != "instance-ids" else {}
    if not image_files and not instance_files and not polygon_files:
        raise UserError(f"Cityscapes root {root}: no *{IMAGE_SUFFIX} under {images_dir} and no annotation under "
                        f"{annotations_dir}; expected {LAYOUT}")

    report = ConversionReport()
    for key in sorted((instance_files.keys() | polygon_files.keys()) - image_files.keys()):
        report.skip(ANNOTATION_WITHOUT_IMAGE, _relative(instance_files.get(key) or polygon_files[key], annotations_dir))
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for key in sorted(image_files):
        file_name = _relative(image_files[key], images_dir)
        annotation_file = instance_files.get(key) or polygon_files.get(key)
        if annotation_file is None:
            report.skip(IMAGE_WITHOUT_ANNOTATION, file_name)
            continue
        try:
            height, width = displayed_size(image_files[key], max_pixels=max_image_pixels)
        except UnusableImageError as err:
            report.skip(err.reason, file_name)
            continue
        name = _relative(annotation_file, annotations_dir)
        if annotation_file.name.endswith(INSTANCE_IDS_SUFFIX):
            ids = _read_instance_ids(annotation_file)
            kind = "instanceIds"
        else:
            ids = _render_polygons(annotation_file, name, report)
            kind = "polygons"
        if ids is None:
            report.skip(MALFORMED_ANNOTATION, name)
            continue
        if ids.shape != (height, width):
            report.skip(SIZE_MISMATCH, f"{name} ({ids.shape[0]}x{ids.shape[1]}, image {height}x{width})")
            continue
        report.sources[kind] += 1
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        found = instances_from_ids(ids)
        if not any(not crowd for _, crowd, _ in found):
            report.empty_images.append(file_name)
        for category_id, crowd, mask in found:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "iscrowd": int(crowd), **mask_annotation(mask)})
    header = {"format": "cityscapes", "split": split, "source": source, "images_dir": str(images_dir),
              "annotations_dir": str(annotations_dir)}
    return write_conversion(out, images=images, annotations=annotations, categories=CATEGORIES, report=report,
                            header=header)


def instances_from_ids(ids: np.ndarray) -> list[tuple[int, bool, np.ndarray]]:
    """(category id, is crowd, mask [H, W]) of every evaluated instance and group region of an instanceIds map.

    Ordered by class (the table's order), the group region first, then instances by their number.
    """
    values = np.unique(ids)
    found = []
    for label in EVAL_LABELS:
        if label.id in values:
            found.append((label.id, True, ids == label.id))
        for value in values[(values // 1000) == label.id]:
            found.append((label.id, False, ids == value))
    return found


def _read_instance_ids(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            if image.mode not in ("I", "I;16", "I;16L", "I;16B", "I;16N", "L"):
                return None  # a colour PNG is not an id map
            return np.asarray(image, dtype=np.int64)
    except (OSError, ValueError, SyntaxError):
        return None


def _render_polygons(path: Path, name: str, report: ConversionReport) -> np.ndarray | None:
    """The instanceIds map of a polygons json, or None if the file is not one; bad objects are skipped and named."""
    try:
        data = json.loads(path.read_text())
        height, width, objects = data["imgHeight"], data["imgWidth"], data["objects"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (_is_int(height) and _is_int(width) and height > 0 and width > 0 and isinstance(objects, list)):
        return None
    kept = []
    for index, obj in enumerate(objects):
        problem = _object_problem(obj)
        if problem is not None:
            label = obj.get("label") if isinstance(obj, dict) else None
            report.skip(problem, f"{name}: object {index} (label {label!r})")
            continue
        kept.append({"label": obj["label"], "polygon": obj["polygon"], "deleted": obj.get("deleted", 0)})
    annotation = Annotation()
    annotation.fromJsonText(json.dumps({"imgHeight": height, "imgWidth": width, "objects": kept}))
    return np.asarray(createInstanceImage(annotation, "ids"), dtype=np.int64)


def _object_problem(obj: Any) -> str | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("label"), str) or "polygon" not in obj:
        return MALFORMED_OBJECT
    label = obj["label"]
    # createInstanceImage's own rule: a known name, or a known name + "group".
    if label not in name2label and not (label.endswith("group") and label[: -len("group")] in name2label):
        return UNKNOWN_LABEL
    polygon = obj["polygon"]
    if not isinstance(polygon, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in polygon):
        return MALFORMED_OBJECT
    if not all(_is_number(v) for point in polygon for v in point):
        return BAD_NUMBER
    if len(polygon) < 3:
        return TOO_FEW_POINTS
    return None


def _by_key(folder: Path, suffix: str) -> dict[str, Path]:
    """``<city>/<city>_<seq>_<frame>`` -> file, for every ``<city>/*<suffix>`` under ``folder``."""
    return {f"{path.parent.name}/{path.name[: -len(suffix)]}": path for path in folder.glob(f"*/*{suffix}")}


def _relative(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))
