"""The data step of ``sp-ray run``: the user's COCO set checked, its usable images kept, val held out when
none is given, and the unlabeled pool linked into one folder.

`check_user_data` runs before any step (seconds, no Ray) and fails with one message naming the file when
the data is unusable; `prepare_user_data` is the step. Images that are listed but missing, unreadable or of
another size than the json says are left out of ``data/train.json`` / ``data/val.json`` and counted in
``data/summary.json`` (the report prints the counts), as every sp-ray reader counts its skips.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from sp_ray.data.coco import link_images, read_coco_json
from sp_ray.data.images import displayed_size, list_image_files
from sp_ray.errors import UserError
from sp_ray.run.runner import write_json
from sp_ray.run.settings import Layout, UserData
from sp_ray.train.preflight import check_coco_data

MISSING = "missing"
UNREADABLE = "unreadable"
SIZE_MISMATCH = "size differs from the json"


def check_user_data(data: UserData) -> None:
    """Everything about the input that can be checked before a step runs.

    Raises:
        UserError: the json does not parse as COCO, lists no images, annotations or categories, the image
            folder holds none of its images, the val set's categories differ, an unlabeled folder holds no
            image, or too few images are left to hold out a val set.
    """
    train = check_coco_data(data.annotations, data.images, what="--annotations", images_what="--images")
    if not train["annotations"]:
        raise UserError(f"--annotations {data.annotations} has no annotations; sp-ray run fine-tunes on labeled "
                        "instances (give the COCO instance json of the labeled images)")
    if data.val_annotations is not None:
        val = check_coco_data(data.val_annotations, data.val_images or data.images, what="--val-annotations",
                              images_what="--val-images")
        ids = lambda d: sorted(c["id"] for c in d["categories"])  # noqa: E731
        if ids(val) != ids(train):
            raise UserError(f"--val-annotations {data.val_annotations} has category ids {ids(val)[:10]} but "
                            f"--annotations has {ids(train)[:10]}; both must list the same categories")
    elif not 0 < data.val_fraction < 1:
        raise UserError(f"val fraction {data.val_fraction}: it must be in (0, 1) to hold out val images")
    elif len(train["images"]) < 2:
        raise UserError(f"--annotations {data.annotations} lists {len(train['images'])} image: holding out a val "
                        "set needs at least 2; give --val-annotations")
    for folder in data.unlabeled:
        if not folder.is_dir():
            raise UserError(f"--unlabeled {folder} is not a folder; give folders of unlabeled images")
        try:
            found = list_image_files(folder)
        except ValueError:
            found = []
        if not found:
            raise UserError(f"--unlabeled {folder} holds no image files; give folders of unlabeled images")


def _usable(coco: dict[str, Any], folder: Path) -> tuple[dict[str, Any], Counter[str], dict[str, list[str]]]:
    """The json with only the images that exist, read and have the json's size, and the counts of the others."""
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    kept = []
    for image in coco["images"]:
        path = folder / image["file_name"]
        reason = None
        if not path.is_file():
            reason = MISSING
        else:
            try:
                if displayed_size(path) != (image["height"], image["width"]):
                    reason = SIZE_MISMATCH
            except OSError:
                reason = UNREADABLE
        if reason is None:
            kept.append(image)
        else:
            skipped[reason] += 1
            shown = examples.setdefault(reason, [])
            if len(shown) < 3:
                shown.append(image["file_name"])
    ids = {image["id"] for image in kept}
    return ({**coco, "images": kept, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]},
            skipped, examples)


def _subset(coco: dict[str, Any], ids: set[int]) -> dict[str, Any]:
    return {**coco, "images": [i for i in coco["images"] if i["id"] in ids],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def _link_folders(folders: tuple[Path, ...], out: Path) -> tuple[int, Counter[str]]:
    """Symlinks to the readable images of ``folders`` under ``out/<index>/`` (names stay apart)."""
    linked, skipped = 0, Counter()
    for index, folder in enumerate(folders):
        for path in list_image_files(folder):
            try:
                displayed_size(path)
            except OSError:
                skipped[UNREADABLE] += 1
                continue
            link = out / str(index) / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(path.resolve())
            linked += 1
    return linked, skipped


def prepare_user_data(data: UserData, layout: Layout) -> dict[str, Any]:
    """Write ``data/train.json``, ``data/val.json``, the ``data/unlabeled`` links and ``data/summary.json``.

    Without ``data.val_annotations``, ``round(val_fraction * n)`` (at least 1, at most n - 1) of the n usable
    labeled images are val: the ids sorted, permuted by ``numpy.random.default_rng(val_seed)``, the first
    ones taken. Returns the summary.

    Raises:
        UserError: no usable image is left (of train or val).
    """
    layout.data.mkdir(parents=True, exist_ok=True)
    labeled, skipped, examples = _usable(read_coco_json(data.annotations), layout.train_images)
    summary: dict[str, Any] = {
        "annotations": str(data.annotations), "images": str(layout.train_images),
        "listed_images": len(labeled["images"]) + sum(skipped.values()), "usable_images": len(labeled["images"]),
        "skipped": dict(skipped), "skipped_examples": examples,
        "categories": [{"id": c["id"], "name": c["name"]} for c in labeled["categories"]],
    }
    if not labeled["images"]:
        raise UserError(f"--annotations {data.annotations}: none of its images in {layout.train_images} is usable "
                        f"({dict(skipped)}); fix the image folder or the json's file_name / height / width")
    if data.val_annotations is not None:
        train = labeled
        val, val_skipped, val_examples = _usable(read_coco_json(data.val_annotations), layout.val_images)
        if not val["images"]:
            raise UserError(f"--val-annotations {data.val_annotations}: none of its images in {layout.val_images} "
                            f"is usable ({dict(val_skipped)})")
        summary["val"] = {"source": str(data.val_annotations), "listed_images": len(val["images"]) +
                          sum(val_skipped.values()), "skipped": dict(val_skipped), "skipped_examples": val_examples}
    else:
        ids = np.array(sorted(image["id"] for image in labeled["images"]), dtype=np.int64)
        if len(ids) < 2:
            raise UserError(f"--annotations {data.annotations}: {len(ids)} usable image, too few to hold out a val "
                            "set; give --val-annotations")
        count = min(len(ids) - 1, max(1, round(data.val_fraction * len(ids))))
        held = set(ids[np.random.default_rng(data.val_seed).permutation(len(ids))][:count].tolist())
        val, train = _subset(labeled, held), _subset(labeled, set(ids.tolist()) - held)
        summary["val"] = {"held_out": True, "fraction": data.val_fraction, "seed": data.val_seed}
    summary["train_images"], summary["train_annotations"] = len(train["images"]), len(train["annotations"])
    summary["val_images"], summary["val_annotations"] = len(val["images"]), len(val["annotations"])
    layout.train_json.write_text(json.dumps(train, separators=(",", ":")))
    layout.val_json.write_text(json.dumps(val, separators=(",", ":")))
    if data.unlabeled:
        linked, pool_skipped = _link_folders(data.unlabeled, layout.unlabeled)
        if linked == 0:
            raise UserError(f"--unlabeled {' '.join(map(str, data.unlabeled))}: no readable image")
        summary["unlabeled"] = {"folders": [str(f) for f in data.unlabeled], "images": linked,
                                "skipped": dict(pool_skipped)}
    else:
        link_images(layout.train_json, layout.train_images, layout.unlabeled)
        summary["unlabeled"] = {"folders": [], "images": len(train["images"]), "skipped": {}}
    write_json(layout.data_summary, summary)
    return summary


def prepare_synthetic_data(num_images: int, image_size: int, layout: Layout) -> dict[str, Any]:
    """The synthetic shapes (seed 0) under ``data/``, the train images linked as the unlabeled pool."""
    from sp_ray.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(layout.data, num_images=num_images, image_size=image_size, seed=0)
    link_images(layout.train_json, layout.images, layout.unlabeled)
    train, val = read_coco_json(layout.train_json), read_coco_json(layout.val_json)
    summary = {
        "synthetic": {"num_images": num_images, "image_size": image_size, "seed": 0},
        "listed_images": num_images, "usable_images": num_images, "skipped": {},
        "categories": [{"id": c["id"], "name": c["name"]} for c in train["categories"]],
        "train_images": len(train["images"]), "train_annotations": len(train["annotations"]),
        "val_images": len(val["images"]), "val_annotations": len(val["annotations"]),
        "unlabeled": {"folders": [], "images": len(train["images"]), "skipped": {}},
    }
    write_json(layout.data_summary, summary)
    return summary
