"""COCO instance-segmentation json + image folder -> (image, target) items for training."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from sp_ray.data.images import displayed_size, load_image_rgb
from sp_ray.data.transforms import mask_boxes
from sp_ray.types import Target

# Skip reasons: the keys of `CocoInstanceDataset.skipped`.
MISSING_IMAGE = "missing or unreadable image file"
SIZE_MISMATCH = "image size differs from json width/height"
ON_SKIPPED_IMAGE = "on a skipped image"
UNKNOWN_IMAGE = "unknown image id"
DEGENERATE_SEGMENTATION = "empty or degenerate segmentation"
MALFORMED_SEGMENTATION = "malformed segmentation (RLE size or counts do not fit the image)"
BAD_BOX = "box outside the image or non-positive width/height"
UNKNOWN_CATEGORY = "unknown category id"
EMPTY_AFTER_TRANSFORM = "instance empty after resize"

_MAX_EXAMPLES = 3
_RLE_ALPHABET = re.compile(r"[0-o]*")  # the 64 characters chr(48)..chr(111) of COCO's compressed RLE
_REQUIRED_FIELDS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "segmentation"),
    "categories": ("id", "name"),
}


class DatasetSkipWarning(UserWarning):
    """The one summary warning a dataset emits when it skipped images or annotations."""


class _Skip(Exception):
    """Internal: an annotation is unusable for the reason in ``args[0]``."""


def read_coco_json(path: str | Path) -> dict[str, Any]:
    """Read a COCO instance-format json and check its structure.

    Args:
        path: the json file.

    Returns:
        the parsed json dict with ``images``, ``annotations`` and ``categories`` lists whose entries
        have the fields COCO requires (images: id, file_name, height, width; annotations: id,
        image_id, category_id, segmentation; categories: id, name) and unique image and
        category ids.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not JSON or not COCO instance format; the message names the file
            and the offending entry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist; pass the path of a COCO json")
    try:
        with path.open("rb") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); pass a COCO instance-format json") from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{path} is not COCO instance format: the top level is a {type(data).__name__}, expected an "
            "object with 'images', 'annotations' and 'categories' lists"
        )
    for key, fields in _REQUIRED_FIELDS.items():
        entries = data.get(key)
        if not isinstance(entries, list):
            raise ValueError(
                f"{path} is not COCO instance format: '{key}' is missing or not a list "
                "(a COCO instance json has 'images', 'annotations' and 'categories' lists)"
            )
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: {key}[{index}] is a {type(entry).__name__}, expected an object")
            missing = [field for field in fields if field not in entry]
            if missing:
                raise ValueError(f"{path}: {key}[{index}] lacks required field(s) {', '.join(missing)}")
            for field in fields:
                if field in ("id", "image_id", "category_id") and not _is_int(entry[field]):
                    raise ValueError(f"{path}: {key}[{index}].{field} = {entry[field]!r} is not an integer")
    for index, image in enumerate(data["images"]):
        sizes_ok = all(_is_int(image[field]) and image[field] > 0 for field in ("height", "width"))
        if not sizes_ok:
            raise ValueError(
                f"{path}: images[{index}] (id {image['id']}) has height={image['height']!r}, "
                f"width={image['width']!r}; both must be positive integers"
            )
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise ValueError(f"{path}: images[{index}].file_name must be a non-empty string")
    for key in ("images", "categories"):
        counts = Counter(entry["id"] for entry in data[key])
        duplicates = sorted(entry_id for entry_id, count in counts.items() if count > 1)
        if duplicates:
            raise ValueError(f"{path}: duplicate {key} id(s) {duplicates[:5]}; ids must be unique")
    return data


class CocoInstanceDataset(Dataset):
    """Images and instance masks of a COCO instance-segmentation json.

    Categories sorted by id become contiguous labels 0..C-1. Crowd regions (``iscrowd=1``) are
    not training targets; COCOeval reads them from the json. Bad input is skipped and counted in
    ``skipped`` (reason -> count), and one `DatasetSkipWarning` per dataset (Python ``warnings``)
    lists each reason with its count and examples:

    - an image file that is missing or whose header PIL cannot read, or whose displayed size
      (after EXIF orientation) differs from the json width/height: the image is removed, with
      its annotations (counted as "on a skipped image");
    - an annotation whose image id or category id is unknown, whose segmentation is empty,
      degenerate (no polygon with >= 3 points, area 0) or malformed, or whose json bbox has a
      non-positive width/height or lies outside the image.

    With ``extra_per_annotation`` (SP pre-training: ``prompts.npy`` of ``sp-ray propose``), row
    ``id - 1`` belongs to annotation ``id`` and rides along with its instance as ``target["queries"]``,
    dropped with it when the instance is skipped or vanishes in the transforms.

    An image that passes the header check but fails to decode in ``__getitem__`` raises an
    error naming the file.

    Attributes:
        class_names: category names by label.
        cat_ids: label -> COCO category id.
        cat_id_to_label: COCO category id -> label.
        image_ids: COCO image ids of the kept images, ascending; item i is ``image_ids[i]``.
        coco: the pycocotools ``COCO`` index of the whole json.
        skipped: Counter of skip reasons (``"instance empty after resize"`` is counted per
            ``__getitem__`` call, in the process that runs it).
    """

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        *,
        transforms: Callable[[tv_tensors.Image, Target], tuple[tv_tensors.Image, Target]] | None = None,
        extra_per_annotation: np.ndarray | None = None,
    ) -> None:
        self.annotations_path = Path(annotations)
        self.image_dir = Path(images)
        self.transforms = transforms
        data = read_coco_json(self.annotations_path)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

        categories = sorted(data["categories"], key=lambda category: category["id"])
        self.class_names: list[str] = [str(category["name"]) for category in categories]
        self.cat_ids: list[int] = [category["id"] for category in categories]
        self.cat_id_to_label: dict[int, int] = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}

        self.skipped: Counter[str] = Counter()
        image_skips: Counter[str] = Counter()
        annotation_skips: Counter[str] = Counter()
        examples: dict[str, list[str]] = defaultdict(list)

        def skip(counter: Counter[str], reason: str, example: str) -> None:
            counter[reason] += 1
            if len(examples[reason]) < _MAX_EXAMPLES:
                examples[reason].append(example)

        kept: set[int] = set()
        for image in data["images"]:
            reason = self._image_problem(image)
            if reason is None:
                kept.add(image["id"])
            else:
                skip(image_skips, reason, str(self.image_dir / image["file_name"]))
        self.image_ids: list[int] = sorted(kept)

        self._instances: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in self.image_ids}
        for ann in data["annotations"]:
            image = self.coco.imgs.get(ann["image_id"])
            if image is None:
                skip(annotation_skips, UNKNOWN_IMAGE, f"annotation id {ann['id']}")
            elif ann["image_id"] not in kept:
                skip(annotation_skips, ON_SKIPPED_IMAGE, f"annotation id {ann['id']}")
            elif ann.get("iscrowd", 0):
                continue
            else:
                reason = self._annotation_problem(ann, image)
                if reason is None:
                    self._instances[ann["image_id"]].append(ann)
                else:
                    skip(annotation_skips, reason, f"annotation id {ann['id']}")

        self.extra_per_annotation = extra_per_annotation
        if extra_per_annotation is not None:
            self._check_extra(extra_per_annotation)
        self.skipped.update(image_skips)
        self.skipped.update(annotation_skips)
        if self.skipped:
            warnings.warn(
                f"{self.annotations_path.name}: skipped "
                f"{sum(image_skips.values())} of {len(data['images'])} images"
                f"{_describe(image_skips, examples)} and "
                f"{sum(annotation_skips.values())} of {len(data['annotations'])} annotations"
                f"{_describe(annotation_skips, examples)}",
                DatasetSkipWarning,
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, Target]:
        """One image and its instances.

        Args:
            index: position in ``image_ids``.

        Returns:
            image: ``tv_tensors.Image`` uint8 [3, H, W] (after ``transforms``).
            target: labels int64 [K], masks ``tv_tensors.Mask`` bool [K, H, W], boxes
            ``tv_tensors.BoundingBoxes`` float32 [K, 4] XYXY from the mask extents, image_id,
            orig_size (H0, W0) as in the json, image_size (H, W) after ``transforms``; with
            ``extra_per_annotation`` also queries float32 [K, C]. Instances whose mask the
            transforms emptied are dropped.
        """
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        pixels = load_image_rgb(path)
        height, width = info["height"], info["width"]
        if pixels.shape[:2] != (height, width):
            raise ValueError(
                f"{path}: decoded image is {pixels.shape[0]}x{pixels.shape[1]} (HxW, after EXIF orientation) "
                f"but {self.annotations_path} says {height}x{width}; fix the json height/width or the image"
            )
        anns = self._instances[image_id]
        if anns:
            rles = [_segmentation_rle(ann["segmentation"], height, width) for ann in anns]
            for ann, rle in zip(anns, rles, strict=True):
                if isinstance(rle["counts"], str) and _rle_string_total(rle["counts"]) != height * width:
                    raise ValueError(
                        f"{self.annotations_path}: annotation id {ann['id']} (image {path}) has a compressed "
                        f"RLE whose runs do not cover the {height}x{width} image; fix or remove it"
                    )
            decoded = mask_utils.decode(rles)  # (H, W, K)
            masks = torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1)) > 0)
        else:
            masks = torch.zeros((0, height, width), dtype=torch.bool)
        image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
        labels = [self.cat_id_to_label[ann["category_id"]] for ann in anns]
        target = Target(
            labels=torch.tensor(labels, dtype=torch.int64),
            masks=tv_tensors.Mask(masks),
            boxes=tv_tensors.BoundingBoxes(mask_boxes(masks), format="XYXY", canvas_size=(height, width)),
            image_id=image_id,
            orig_size=(height, width),
            image_size=(height, width),
        )
        if self.extra_per_annotation is not None:
            rows = [ann["id"] - 1 for ann in anns]
            target["queries"] = torch.from_numpy(np.asarray(self.extra_per_annotation[rows], dtype=np.float32))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if tuple(target["image_size"]) != tuple(image.shape[-2:]):
            raise ValueError(
                f"transforms changed the image of {path} to {tuple(image.shape[-2:])} but left "
                f"image_size={target['image_size']}; end the transforms with RefreshSizeAndBoxes"
            )
        nonempty = target["masks"].flatten(1).any(dim=1)
        if not bool(nonempty.all()):
            self.skipped[EMPTY_AFTER_TRANSFORM] += int((~nonempty).sum())
            target["labels"] = target["labels"][nonempty]
            target["masks"] = tv_tensors.wrap(target["masks"][nonempty], like=target["masks"])
            target["boxes"] = tv_tensors.wrap(target["boxes"][nonempty], like=target["boxes"])
            if "queries" in target:
                target["queries"] = target["queries"][nonempty]
        return image, target

    def _check_extra(self, extra: np.ndarray) -> None:
        if extra.ndim != 2:
            raise ValueError(
                f"extra_per_annotation must be a 2-D array [n, C] (row id - 1 per annotation), "
                f"got shape {extra.shape}"
            )
        for image_id in self.image_ids:
            for ann in self._instances[image_id]:
                if not 1 <= ann["id"] <= extra.shape[0]:
                    raise ValueError(
                        f"{self.annotations_path}: annotation id {ann['id']} has no row in the per-annotation "
                        f"array of {extra.shape[0]} rows (row id - 1); pass the prompts.npy written together "
                        "with this json by 'sp-ray propose'"
                    )

    def _image_problem(self, image: dict[str, Any]) -> str | None:
        try:
            size = displayed_size(self.image_dir / image["file_name"])
        except OSError:
            return MISSING_IMAGE
        if size != (image["height"], image["width"]):
            return SIZE_MISMATCH
        return None

    def _annotation_problem(self, ann: dict[str, Any], image: dict[str, Any]) -> str | None:
        if ann["category_id"] not in self.cat_id_to_label:
            return UNKNOWN_CATEGORY
        height, width = image["height"], image["width"]
        if "bbox" in ann and not _box_inside(ann["bbox"], height, width):
            return BAD_BOX
        try:
            rle = _segmentation_rle(ann["segmentation"], height, width)
        except _Skip as skip:
            return skip.args[0]
        try:
            area = int(mask_utils.area(rle))
        except ValueError:
            return MALFORMED_SEGMENTATION
        if area == 0:
            return DEGENERATE_SEGMENTATION
        if area > height * width:
            return MALFORMED_SEGMENTATION
        return None


def _segmentation_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    if isinstance(segmentation, list):
        polygons = [[float(value) for value in polygon] for polygon in segmentation if _is_polygon(polygon)]
        if not polygons:
            raise _Skip(DEGENERATE_SEGMENTATION)
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise _Skip(MALFORMED_SEGMENTATION)
    if not isinstance(segmentation["size"], (list, tuple)) or list(segmentation["size"]) != [height, width]:
        raise _Skip(MALFORMED_SEGMENTATION)
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(_is_int(count) and count >= 0 for count in counts) or sum(counts) != height * width:
            raise _Skip(MALFORMED_SEGMENTATION)
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        # pycocotools reads past the end of strings outside its alphabet and returns garbage areas.
        if not _RLE_ALPHABET.fullmatch(counts):
            raise _Skip(MALFORMED_SEGMENTATION)
        return {"size": [height, width], "counts": counts}
    raise _Skip(MALFORMED_SEGMENTATION)


def _rle_string_total(counts: str) -> int | None:
    """Sum of the run lengths of a COCO compressed RLE string, or None when it is not well formed.

    The string holds each run as little-endian 5-bit groups (character - 48), bit 0x20 meaning
    "more groups follow" and bit 0x10 of the last group the sign; runs after the second are stored
    as differences to the run two places back. pycocotools decodes strings whose runs do not sum
    to H*W into garbage without an error, so ``__getitem__`` checks the total first.
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                return None
            group = ord(counts[position]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
    return sum(runs)


def _is_polygon(polygon: Any) -> bool:
    # At least 3 (x, y) points: pycocotools would read a 2-point list as an xywh box.
    return (
        isinstance(polygon, list)
        and len(polygon) >= 6
        and len(polygon) % 2 == 0
        and all(_is_finite_number(value) for value in polygon)
    )


def _box_inside(box: Any, height: int, width: int) -> bool:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_finite_number(v) for v in box):
        return False
    x, y, w, h = (float(value) for value in box)
    if w <= 0 or h <= 0:
        return False
    return x < width and y < height and x + w > 0 and y + h > 0


def _describe(counter: Counter[str], examples: dict[str, list[str]]) -> str:
    if not counter:
        return ""
    parts = [
        f"{reason}: {count}, e.g. {', '.join(examples[reason])}" for reason, count in counter.most_common()
    ]
    return " (" + "; ".join(parts) + ")"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
