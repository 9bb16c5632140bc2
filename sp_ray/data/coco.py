"""COCO instance-segmentation json + image folder -> (image, target) items for training."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from export.geometry import MAX_IMAGE_PIXELS
from sp_ray.data.images import TOO_LARGE, UNREADABLE, UnusableImageError, displayed_size, load_image_rgb
from sp_ray.data.transforms import mask_boxes
from sp_ray.types import Target

# Skip reasons: the keys of `CocoInstanceDataset.skipped`. The two image rules are those of every
# sp-ray image reader (`sp_ray.data.images`).
MISSING_IMAGE = UNREADABLE
IMAGE_TOO_LARGE = TOO_LARGE
SIZE_MISMATCH = "image size differs from json width/height"
ON_SKIPPED_IMAGE = "on a skipped image"
UNKNOWN_IMAGE = "unknown image id"
DEGENERATE_SEGMENTATION = "empty or degenerate segmentation"
MALFORMED_SEGMENTATION = "malformed segmentation (RLE size or counts do not fit the image)"
BAD_BOX = "box outside the image or non-positive width/height"
UNKNOWN_CATEGORY = "unknown category id"
EMPTY_AFTER_TRANSFORM = "instance empty after transforms"  # a resize or a rotation emptied its mask

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


def link_images(annotations: str | Path, images: str | Path, folder: str | Path) -> Path:
    """A folder of symlinks to the images of a COCO json (``sp-ray ssl`` reads a folder, not a json).

    Args:
        annotations: the COCO json whose ``images`` are linked (its annotations are not read).
        images: the folder its ``file_name`` entries are relative to.
        folder: where the links go (created; existing links are kept).

    Returns:
        ``folder``.
    """
    folder, images = Path(folder), Path(images)
    folder.mkdir(parents=True, exist_ok=True)
    for image in read_coco_json(annotations)["images"]:
        link = folder / image["file_name"]
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((images / image["file_name"]).resolve())
    return folder


class CocoInstanceDataset(Dataset):
    """Images and instance masks of a COCO instance-segmentation json.

    Categories sorted by id become contiguous labels 0..C-1. Crowd regions (``iscrowd=1``) are
    not training targets; they are kept for COCOeval as ignore regions (``coco_ground_truth``). Bad
    input is skipped and counted in ``skipped`` (reason -> count), and one `DatasetSkipWarning` per
    dataset (Python ``warnings``) lists each reason with its count and examples:

    - an image file that is missing or whose header PIL cannot read, that is larger than
      ``max_image_pixels`` (PIL's decompression-bomb case included), or whose displayed size (after
      EXIF orientation) differs from the json width/height: the image is removed, with its
      annotations (counted as "on a skipped image");
    - an annotation (crowd regions included) whose image id or category id is unknown, whose
      segmentation is empty, degenerate (no polygon with >= 3 points, area 0) or malformed, or whose
      json bbox has a non-positive width/height or lies outside the image.

    With ``extra_per_annotation`` (SP pre-training: ``prompts.npy`` of ``sp-ray propose``), row
    ``id - 1`` belongs to annotation ``id`` and rides along with its instance as ``target["queries"]``,
    dropped with it when the instance is skipped or vanishes in the transforms.

    An image that passes the header check but does not decode (a truncated JPEG) is found only when
    it is read: ``load`` / ``read_image`` raise `UnusableImageError` and record it in ``unreadable``
    (counted in ``skipped`` once, with a `DatasetSkipWarning`); ``__getitem__``, which training's
    loader calls, then returns the next image that decodes instead, so an epoch goes on.

    Attributes:
        class_names: category names by label.
        cat_ids: label -> COCO category id.
        cat_id_to_label: COCO category id -> label.
        image_ids: COCO image ids of the kept images, ascending; item i is ``image_ids[i]``.
        coco: the pycocotools ``COCO`` index of the whole json.
        skipped: Counter of skip reasons (``"instance empty after transforms"`` is counted per
            ``__getitem__`` call, images that fail to decode once, in the process that reads them).
        skipped_images: the image reasons of ``skipped``, Counter.
        skipped_annotations: the annotation reasons of ``skipped``, Counter.
        unreadable: image id -> reason of each kept image that failed to decode when read.
        max_image_pixels: images with more pixels (H x W) are skipped.
    """

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        *,
        transforms: Callable[[tv_tensors.Image, Target], tuple[tv_tensors.Image, Target]] | None = None,
        extra_per_annotation: np.ndarray | None = None,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.annotations_path = Path(annotations)
        self.image_dir = Path(images)
        self.transforms = transforms
        if max_image_pixels < 1:
            raise ValueError(f"max_image_pixels (data.max_image_pixels) must be >= 1, got {max_image_pixels}")
        self.max_image_pixels = max_image_pixels
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
        self._crowd: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in self.image_ids}
        self._annotation_counts: Counter[int] = Counter()
        for ann in data["annotations"]:
            image = self.coco.imgs.get(ann["image_id"])
            if image is None:
                skip(annotation_skips, UNKNOWN_IMAGE, f"annotation id {ann['id']}")
                continue
            if ann["image_id"] not in kept:
                skip(annotation_skips, ON_SKIPPED_IMAGE, f"annotation id {ann['id']}")
                continue
            self._annotation_counts[ann["image_id"]] += 1
            reason = self._annotation_problem(ann, image)
            if reason is not None:
                skip(annotation_skips, reason, f"annotation id {ann['id']}")
            elif ann.get("iscrowd", 0):
                self._crowd[ann["image_id"]].append(ann)
            else:
                self._instances[ann["image_id"]].append(ann)

        self.extra_per_annotation = extra_per_annotation
        if extra_per_annotation is not None:
            self._check_extra(extra_per_annotation)
        self.skipped.update(image_skips)
        self.skipped.update(annotation_skips)
        self.skipped_images, self.skipped_annotations = image_skips, annotation_skips
        self.unreadable: dict[int, str] = {}
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
        """``load(index)``, or the next item that decodes when this image does not (training goes on).

        Raises:
            UnusableImageError: none of the images decodes.
        """
        for offset in range(len(self)):
            try:
                return self.load((index + offset) % len(self))
            except UnusableImageError:
                continue  # recorded, counted and warned about by read_image
        raise UnusableImageError(
            self.image_dir, UNREADABLE,
            f"none of the {len(self)} images of {self.annotations_path} under {self.image_dir} decodes "
            f"(e.g. {self.image_dir / self.coco.imgs[self.image_ids[index]]['file_name']})",
        )  # fmt: skip

    def read_image(self, index: int) -> np.ndarray:
        """The decoded pixels of item ``index``: uint8 [H0, W0, 3] as displayed.

        Raises:
            UnusableImageError: the file no longer reads or does not decode; the image is recorded in
                ``unreadable`` and, the first time, counted in ``skipped`` with its annotations and
                reported with a `DatasetSkipWarning`.
            ValueError: the decoded size differs from the json's height / width.
        """
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            pixels = load_image_rgb(path, max_pixels=self.max_image_pixels)
        except UnusableImageError as err:
            if image_id not in self.unreadable:
                self.unreadable[image_id] = err.reason
                self.skipped_images[err.reason] += 1
                self.skipped[err.reason] += 1
                lost = self._annotation_counts[image_id]
                if lost:
                    self.skipped_annotations[ON_SKIPPED_IMAGE] += lost
                    self.skipped[ON_SKIPPED_IMAGE] += lost
                warnings.warn(
                    f"{self.annotations_path.name}: skipped image id {image_id} ({err.reason}: {err}) with its "
                    f"{lost} annotations; {len(self.unreadable)} image(s) failed to decode so far",
                    DatasetSkipWarning,
                    stacklevel=2,
                )
            raise
        height, width = info["height"], info["width"]
        if pixels.shape[:2] != (height, width):
            raise ValueError(
                f"{path}: decoded image is {pixels.shape[0]}x{pixels.shape[1]} (HxW, after EXIF orientation) "
                f"but {self.annotations_path} says {height}x{width}; fix the json height/width or the image"
            )
        return pixels

    def load(self, index: int) -> tuple[tv_tensors.Image, Target]:
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

        Raises:
            UnusableImageError: the image does not decode (see ``read_image``).
        """
        pixels = self.read_image(index)
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        height, width = info["height"], info["width"]
        anns = self._instances[image_id]
        if anns:
            rles = [self._checked_rle(ann, height, width, path) for ann in anns]
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

    def coco_ground_truth(self, image_ids: Sequence[int] | None = None) -> COCO:
        """The ground truth COCOeval scores against, by this dataset's rules (one rule, not two).

        Holds the images ``image_ids`` (default: every kept image that has not failed to decode), their
        annotations that are training targets and their valid crowd regions (ignore regions), each
        segmentation replaced by the RLE this dataset decodes (an annotation's degenerate polygons
        dropped, as for training), with ``area``, ``bbox`` and ``iscrowd`` taken from the json when
        valid and from the mask otherwise. What the dataset skips is not ground truth either: COCOeval
        on the raw json fails on a 2-point polygon (``TypeError: Argument 'bb'``), and an image that is
        not predicted must not count its objects as missed.

        Args:
            image_ids: COCO image ids, a subset of ``image_ids``.

        Returns:
            a pycocotools ``COCO`` index with ``images``, ``annotations`` and ``categories``.

        Raises:
            ValueError: an id that is not a kept image, or a compressed RLE whose runs do not cover its
                image (the error ``load`` gives for it).
        """
        ids = [i for i in self.image_ids if i not in self.unreadable] if image_ids is None else list(image_ids)
        unknown = sorted(set(ids) - set(self._instances))
        if unknown:
            raise ValueError(f"coco_ground_truth: image ids {unknown[:5]} are not kept images of this dataset")
        annotations = []
        for image_id in ids:
            info = self.coco.imgs[image_id]
            height, width = info["height"], info["width"]
            for ann in self._instances[image_id] + self._crowd[image_id]:
                rle = self._checked_rle(ann, height, width, self.image_dir / info["file_name"])
                area = ann.get("area")
                if not (_is_finite_number(area) and area >= 0):
                    area = float(mask_utils.area(rle))
                bbox = ann.get("bbox")
                if bbox is None:
                    bbox = [float(v) for v in mask_utils.toBbox(rle)]
                annotations.append({**ann, "segmentation": rle, "area": area, "bbox": bbox,
                                    "iscrowd": int(bool(ann.get("iscrowd", 0)))})
        coco = COCO()
        coco.dataset = {
            "images": [self.coco.imgs[image_id] for image_id in ids],
            "annotations": annotations,
            "categories": self.coco.dataset["categories"],
        }
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def _checked_rle(self, ann: dict[str, Any], height: int, width: int, path: Path) -> dict[str, Any]:
        """The RLE of an annotation that passed ``_annotation_problem``, with its runs' total checked."""
        rle = _segmentation_rle(ann["segmentation"], height, width)
        # Checked here, not for every annotation at start-up: summing the runs of a string is slow.
        if isinstance(rle["counts"], str) and _rle_string_total(rle["counts"]) != height * width:
            raise ValueError(
                f"{self.annotations_path}: annotation id {ann['id']} (image {path}) has a compressed "
                f"RLE whose runs do not cover the {height}x{width} image; fix or remove it"
            )
        return rle

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
            size = displayed_size(self.image_dir / image["file_name"], max_pixels=self.max_image_pixels)
        except UnusableImageError as err:
            return err.reason
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


def segmentation_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO segmentation (polygons, uncompressed RLE, or compressed RLE with str or bytes counts) as one
    RLE of an image of ``height`` x ``width``, by the rules the dataset applies to its annotations.

    Raises:
        ValueError: the segmentation is not one of those forms, has no polygon of 3 or more points, has an
            RLE ``size`` other than [height, width], or runs that do not cover the image; the message is the
            reason.
    """
    try:
        rle = _segmentation_rle(segmentation, height, width)
    except _Skip as skip:
        raise ValueError(skip.args[0]) from None
    if isinstance(rle["counts"], str) and _rle_string_total(rle["counts"]) != height * width:
        raise ValueError(MALFORMED_SEGMENTATION)
    return rle


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
