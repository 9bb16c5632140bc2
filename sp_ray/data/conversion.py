"""What every dataset converter shares: COCO annotations from masks or polygons, the skip report, the output files.

``sp-ray data convert`` (``sp_ray.data.cityscapes``, ``sp_ray.data.ctw1500``) writes a COCO instance json and,
next to it, ``<out stem>.summary.json``: the counts of images, instances per category and crowd regions, the
images without any instance (kept, with zero annotations) and every skipped file or object under its reason,
with its name. Nothing a real dataset contains (a missing pair, a broken file, a bad polygon) stops a
conversion; only a root that is not the dataset's layout does (a ``UserError`` naming the layout).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sp_ray.errors import UserError

# Skip reasons shared by the converters (the keys of ``ConversionReport.skipped``).
IMAGE_WITHOUT_ANNOTATION = "image without annotation file"
ANNOTATION_WITHOUT_IMAGE = "annotation file without image"
MALFORMED_ANNOTATION = "unreadable or malformed annotation file"
SIZE_MISMATCH = "annotation size differs from the image's"
BAD_NUMBER = "polygon with a coordinate that is not a finite number"
ODD_COORDINATES = "polygon with an odd number of coordinates"
TOO_FEW_POINTS = "polygon with fewer than 3 points"
NO_PIXELS = "polygon without pixels inside the image"

_PRINTED_NAMES = 5


@dataclass
class ConversionReport:
    """Counts and names of what a conversion kept, noted and skipped.

    Attributes:
        skipped: reason -> names of the skipped files (``aachen/x_gtFine_instanceIds.png``) or objects
            (``0001.xml: box 3``), in the order met.
        empty_images: file names of the images kept with no instance.
        sources: how many images were read from each annotation source (Cityscapes: instanceIds or polygons).
    """

    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    empty_images: list[str] = field(default_factory=list)
    sources: Counter[str] = field(default_factory=Counter)

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason].append(name)


def polygon_from_numbers(values: list[Any]) -> tuple[list[float] | None, str | None]:
    """A flat COCO polygon ``[x1, y1, x2, y2, ...]`` from parsed or textual numbers, or the reason it is unusable.

    Returns:
        (polygon, None), or (None, one of BAD_NUMBER, ODD_COORDINATES, TOO_FEW_POINTS).
    """
    numbers: list[float] = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None, BAD_NUMBER
        if not np.isfinite(number):
            return None, BAD_NUMBER
        numbers.append(number)
    if len(numbers) % 2:
        return None, ODD_COORDINATES
    if len(numbers) < 6:
        return None, TOO_FEW_POINTS
    return numbers, None


def polygon_annotation(polygon: list[float], height: int, width: int) -> dict[str, Any] | None:
    """``segmentation`` (the polygon, as given), ``area`` and ``bbox`` of one polygon instance.

    Area and box are those of the polygon rasterised by pycocotools at the image size, i.e. what COCOeval and
    sp-ray's loader see; None when no pixel of it lies inside the image.
    """
    rle = mask_utils.frPyObjects([polygon], height, width)[0]
    area = int(mask_utils.area(rle))
    if area == 0:
        return None
    return {"segmentation": [polygon], "area": area, "bbox": [float(v) for v in mask_utils.toBbox(rle)]}


def mask_annotation(mask: np.ndarray) -> dict[str, Any]:
    """``segmentation`` (compressed COCO RLE), ``area`` and ``bbox`` of a non-empty binary mask [H, W]."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = int(mask_utils.area(rle))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    return {"segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": area, "bbox": bbox}


def summary_path(out: str | Path) -> Path:
    """``A.json`` -> ``A.summary.json``, where a conversion writes its report."""
    out = Path(out)
    return out.with_name(f"{out.stem}.summary.json")


def write_conversion(
    out: str | Path,
    *,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]],
    report: ConversionReport,
    header: dict[str, Any],
) -> dict[str, Any]:
    """Write the COCO json and its ``.summary.json``; returns the summary.

    Args:
        out: the COCO json to write (parent folders are created).
        images, annotations, categories: the COCO lists.
        report: what was skipped and noted on the way.
        header: facts of the conversion put first in the summary (format, split, folders read).

    Raises:
        UserError: not one image was converted (the summary is still written, naming every skip).
    """
    out = Path(out)
    names = {category["id"]: category["name"] for category in categories}
    instances = Counter(names[a["category_id"]] for a in annotations if not a["iscrowd"])
    crowd = Counter(names[a["category_id"]] for a in annotations if a["iscrowd"])
    summary: dict[str, Any] = {
        **header,
        "out": str(out),
        "images": len(images),
        "annotations": len(annotations),
        "instances_per_category": {name: instances.get(name, 0) for name in names.values()},
        "crowd_per_category": {name: crowd.get(name, 0) for name in names.values()},
        "images_without_instances": {"count": len(report.empty_images), "files": report.empty_images},
        "sources": dict(sorted(report.sources.items())),
        "skipped": {reason: {"count": len(files), "files": files} for reason, files in sorted(report.skipped.items())},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    summary_path(out).write_text(json.dumps(summary, indent=2) + "\n")
    if not images:
        raise UserError(f"no image of {header.get('images_dir', 'the dataset')} could be converted: "
                        f"{describe_skips(summary)}; see {summary_path(out)}")
    coco = {
        "info": {"description": f"{header.get('format')} {header.get('split')} converted by sp-ray data convert"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    out.write_text(json.dumps(coco, separators=(",", ":")))
    return summary


def skip_lines(summary: dict[str, Any]) -> list[str]:
    """One line per skip reason: its count and the first names."""
    lines = []
    for reason, entry in summary["skipped"].items():
        shown = ", ".join(entry["files"][:_PRINTED_NAMES])
        more = f" and {entry['count'] - _PRINTED_NAMES} more" if entry["count"] > _PRINTED_NAMES else ""
        lines.append(f"{reason}: {entry['count']} ({shown}{more})")
    return lines


def describe_skips(summary: dict[str, Any]) -> str:
    """The skip reasons of a summary on one line, for an error message."""
    return "; ".join(skip_lines(summary)) or "nothing skipped"


def format_summary(summary: dict[str, Any]) -> str:
    """The lines ``sp-ray data convert`` prints: counts, empty images and skips."""
    per_class = ", ".join(f"{name} {count}" for name, count in summary["instances_per_category"].items())
    crowd = sum(summary["crowd_per_category"].values())
    lines = [
        f"{summary['format']} {summary['split']}: {summary['images']} images, {summary['annotations']} annotations "
        f"-> {summary['out']}",
        f"instances: {per_class}; crowd regions (iscrowd 1): {crowd}",
        f"images without instances (kept): {summary['images_without_instances']['count']}",
    ]
    if summary["sources"]:
        lines.append("annotation sources: " + ", ".join(f"{k} {v}" for k, v in summary["sources"].items()))
    if summary["skipped"]:
        lines.append("skipped (counted, named in the summary file):")
        lines.extend(f"  {line}" for line in skip_lines(summary))
    else:
        lines.append("skipped: nothing")
    lines.append(f"summary: {summary_path(summary['out'])}")
    return "\n".join(lines)
