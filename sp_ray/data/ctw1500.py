"""SCUT-CTW1500 curved-text annotations -> COCO instances of one class, ``text``, kept as polygons.

The official archives unpacked into ``root``::

    train_images/0001.jpg ...            ctw1500_train_labels/0001.xml ...      (train_labels.zip)
    test_images/1001.jpg ...             ctw1500_test_labels/0001001.txt ...    (test_labels.zip, end-to-end labels)

(``train_labels/`` and ``test_labels/`` are accepted as label folder names too; ``images`` and ``labels``
override both.) An image and a label file pair when their names, read as numbers, are equal (``1001.jpg`` and
``0001001.txt``), or else when their stems are.

- A train ``.xml`` file: ``<Annotations><image file="0001.jpg"><box height= width= left= top=><label>TEXT</label>
  <segs>x1,y1,...,x14,y14</segs><pts x= y=/>...</box>...</image></Annotations>``; each ``box`` is one instance,
  its ``segs`` the 14-point polygon in absolute pixel coordinates (``pts`` are per-character points, not read).
- A test ``.txt`` file: one instance a line, ``x1,y1,...,xn,yn,####TEXT`` (absolute coordinates, any number of
  points, the ``####TEXT`` part optional).

A text of only ``#`` (``###``, the dataset's mark of illegible or Chinese text, which its evaluation does not
count) makes the instance ``iscrowd: 1``: an ignore region for COCOeval that sp-ray does not train on. The
format is read from each label file's extension, so train labels converted to ``.txt`` read as well.
``area`` and ``bbox`` are those of the polygon rasterised by pycocotools; ``file_name`` is relative to the
images folder.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from export.geometry import MAX_IMAGE_PIXELS
from sp_ray.data.conversion import (
    ANNOTATION_WITHOUT_IMAGE,
    IMAGE_WITHOUT_ANNOTATION,
    MALFORMED_ANNOTATION,
    NO_PIXELS,
    ConversionReport,
    polygon_annotation,
    polygon_from_numbers,
    write_conversion,
)
from sp_ray.data.images import IMAGE_EXTENSIONS, UnusableImageError, displayed_size
from sp_ray.errors import UserError

SPLITS = ("train", "test")
CATEGORIES = [{"id": 1, "name": "text", "supercategory": "text"}]
LABEL_SUFFIXES = (".xml", ".txt")
NO_SEGS = "text box without a <segs> polygon"

LAYOUT = (
    "ROOT/train_images/*.jpg with ROOT/ctw1500_train_labels/*.xml, and ROOT/test_images/*.jpg with "
    "ROOT/ctw1500_test_labels/*.txt (the official train_images.zip, train_labels.zip, test_images.zip and "
    "test_labels.zip unpacked into ROOT), or --images and --labels"
)


def default_folders(root: str | Path, split: str) -> tuple[Path, Path]:
    """(images, labels) folders of ``split`` under ``root``: ``<split>_images`` and the first existing of
    ``ctw1500_<split>_labels`` and ``<split>_labels`` (the first when neither exists)."""
    root = Path(root)
    candidates = [root / f"ctw1500_{split}_labels", root / f"{split}_labels"]
    labels = next((folder for folder in candidates if folder.is_dir()), candidates[0])
    return root / f"{split}_images", labels


def convert_ctw1500(
    out: str | Path,
    *,
    root: str | Path | None = None,
    split: str = "train",
    images: str | Path | None = None,
    labels: str | Path | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Convert one split of CTW1500 to a COCO instance json (see the module docstring).

    Args:
        out: the COCO json to write; ``<out stem>.summary.json`` gets the counts and the skipped files.
        root: the folder of the unpacked archives (the default folders of ``split`` are read from it).
        split: ``"train"`` or ``"test"``: which default folders.
        images: the images folder (overrides ``root``'s).
        labels: the label-file folder (overrides ``root``'s).
        max_image_pixels: images with more pixels are skipped (sp-ray's reader limit).

    Returns:
        the summary (also written): images, instances and crowd (``###``) regions, images without instances and
        every skip under its reason with the file or object name.

    Raises:
        UserError: unknown split, a folder missing or holding no image / label file, or nothing converted.
    """
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: CTW1500 has the splits {' and '.join(SPLITS)}")
    if root is None and (images is None or labels is None):
        raise UserError(f"give --root (expected layout: {LAYOUT}), or both --images and --labels")
    default_images, default_labels = default_folders(root, split) if root is not None else (None, None)
    images_dir = Path(images) if images is not None else default_images
    labels_dir = Path(labels) if labels is not None else default_labels
    for what, folder in (("images", images_dir), ("labels", labels_dir)):
        if not folder.is_dir():
            raise UserError(f"CTW1500 {split} {what} folder {folder} does not exist; expected {LAYOUT}")
    image_files = _by_key(images_dir, IMAGE_EXTENSIONS)
    label_files = _by_key(labels_dir, LABEL_SUFFIXES)
    for what, files, folder in (("image", image_files, images_dir), ("label (.xml / .txt)", label_files, labels_dir)):
        if not files:
            raise UserError(f"CTW1500 {split}: no {what} file in {folder}; expected {LAYOUT}")

    report = ConversionReport()
    for key in sorted(label_files.keys() - image_files.keys(), key=_order):
        report.skip(ANNOTATION_WITHOUT_IMAGE, label_files[key].name)
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for key in sorted(image_files, key=_order):
        file_name = image_files[key].name
        label_file = label_files.get(key)
        if label_file is None:
            report.skip(IMAGE_WITHOUT_ANNOTATION, file_name)
            continue
        try:
            height, width = displayed_size(image_files[key], max_pixels=max_image_pixels)
        except UnusableImageError as err:
            report.skip(err.reason, file_name)
            continue
        texts = _read_xml(label_file) if label_file.suffix.lower() == ".xml" else _read_txt(label_file)
        if texts is None:
            report.skip(MALFORMED_ANNOTATION, label_file.name)
            continue
        image_id = len(coco_images) + 1
        coco_images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        report.sources[label_file.suffix.lower().lstrip(".")] += 1
        kept = 0
        for where, values, text in texts:
            name = f"{label_file.name}: {where}"
            if values is None:
                report.skip(NO_SEGS, name)
                continue
            polygon, problem = polygon_from_numbers(values)
            if polygon is None:
                report.skip(problem, name)
                continue
            instance = polygon_annotation(polygon, height, width)
            if instance is None:
                report.skip(NO_PIXELS, name)
                continue
            crowd = bool(text) and set(text) == {"#"}
            kept += not crowd
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "iscrowd": int(crowd), **instance})
        if not kept:
            report.empty_images.append(file_name)
    header = {"format": "ctw1500", "split": split, "images_dir": str(images_dir), "labels_dir": str(labels_dir)}
    return write_conversion(out, images=coco_images, annotations=annotations, categories=CATEGORIES, report=report,
                            header=header)


def _read_xml(path: Path) -> list[tuple[str, list[str] | None, str]] | None:
    """(``box i``, the ``segs`` numbers or None, the label text) of every box; None for a file that is not the
    dataset's XML."""
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError):
        return None
    if tree.getroot().tag != "Annotations":
        return None
    texts = []
    for index, box in enumerate(tree.getroot().iter("box"), start=1):
        segs = box.findtext("segs")
        values = [value.strip() for value in segs.strip().strip(",").split(",")] if segs and segs.strip() else None
        texts.append((f"box {index}", values, (box.findtext("label") or "").strip()))
    return texts


def _read_txt(path: Path) -> list[tuple[str, list[str] | None, str]] | None:
    """(``line i``, the coordinates, the text after ``####``) of every non-empty line; None if unreadable."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        coordinates, _, text = line.partition("####")
        values = [value.strip() for value in coordinates.strip().strip(",").split(",")]
        texts.append((f"line {number}", values, text.strip()))
    return texts


def _by_key(folder: Path, suffixes: tuple[str, ...]) -> dict[int | str, Path]:
    """Pairing key -> file of every file in ``folder`` with one of ``suffixes``: the stem as a number when it is
    one (``0001001`` -> 1001), else the stem."""
    files: dict[int | str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            files[int(path.stem) if path.stem.isdigit() else path.stem] = path
    return files


def _order(key: int | str) -> tuple[int, int | str]:
    # Numbered files first, by number; named ones after, by name.
    return (0, key) if isinstance(key, int) else (1, key)
