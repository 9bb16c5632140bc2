"""Nested labeled fractions of a COCO json (1%, 5%, 10%, ...) and their unlabeled complements."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sp_ray.data.coco import read_coco_json


def fraction_tag(fraction: float) -> str:
    """The percentage as it appears in split file names: 0.01 -> "1", 0.1 -> "10", 0.005 -> "0.5"."""
    return format(round(fraction * 100, 6), "g")


def split_fractions(
    annotations: str | Path, fractions: Sequence[float], *, seed: int, out_dir: str | Path
) -> dict[float, Path]:
    """Write deterministic, nested labeled subsets of a COCO json.

    The image ids, sorted ascending, are permuted with ``numpy.random.default_rng(seed)``;
    fraction f takes the first ``max(1, round(f * n))`` of that order, so every smaller fraction
    is a subset of every larger one with the same seed. Images are sampled; all their annotations
    follow them.

    Files written in ``out_dir`` (``stem`` is the input file's stem, ``pct`` is `fraction_tag`):
    ``{stem}_{pct}pct_seed{seed}.json`` (the input's other top-level keys, e.g. info and
    categories, with only the chosen images and their annotations),
    ``{stem}_{pct}pct_seed{seed}_unlabeled.txt`` (the file_name of every other image, one per
    line, in json order) and ``split_seed{seed}.json`` (counts per fraction).

    Args:
        annotations: the COCO instance json to split.
        fractions: labeled fractions, each in (0, 1].
        seed: seed of the permutation.
        out_dir: output folder, created if missing.

    Returns:
        fraction -> path of its labeled json.
    """
    if not fractions:
        raise ValueError("fractions is empty; give at least one fraction in (0, 1], e.g. [0.01, 0.05, 0.1]")
    for fraction in fractions:
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise ValueError(f"fraction {fraction!r} is not in (0, 1]; give e.g. 0.1 for 10% of the images")
    tags = [fraction_tag(fraction) for fraction in set(fractions)]
    if len(set(tags)) != len(tags):
        raise ValueError(f"fractions {sorted(set(fractions))} name the same percentage twice in file names")
    annotations = Path(annotations)
    out_dir = Path(out_dir)
    data = read_coco_json(annotations)
    ids = np.array(sorted(image["id"] for image in data["images"]), dtype=np.int64)
    if len(ids) == 0:
        raise ValueError(f"{annotations} has no images to split")
    order = ids[np.random.default_rng(seed).permutation(len(ids))]
    out_dir.mkdir(parents=True, exist_ok=True)

    outputs: dict[float, Path] = {}
    summary: dict[str, Any] = {
        "annotations": str(annotations),
        "seed": seed,
        "num_images": len(ids),
        "num_annotations": len(data["annotations"]),
        "fractions": {},
    }
    for fraction in sorted(set(fractions)):
        chosen = set(order[: max(1, round(fraction * len(ids)))].tolist())
        images = [image for image in data["images"] if image["id"] in chosen]
        anns = [ann for ann in data["annotations"] if ann["image_id"] in chosen]
        unlabeled = [image["file_name"] for image in data["images"] if image["id"] not in chosen]
        subset = {**data, "images": images, "annotations": anns}

        name = f"{annotations.stem}_{fraction_tag(fraction)}pct_seed{seed}"
        labeled_path = out_dir / f"{name}.json"
        unlabeled_path = out_dir / f"{name}_unlabeled.txt"
        labeled_path.write_text(json.dumps(subset, separators=(",", ":")))
        unlabeled_path.write_text("".join(f"{file_name}\n" for file_name in unlabeled))
        outputs[fraction] = labeled_path
        summary["fractions"][fraction_tag(fraction)] = {
            "fraction": fraction,
            "num_images": len(images),
            "num_annotations": len(anns),
            "num_unlabeled": len(unlabeled),
            "labeled": labeled_path.name,
            "unlabeled": unlabeled_path.name,
        }
    (out_dir / f"split_seed{seed}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return outputs
