"""A small synthetic instance-segmentation dataset (textured shapes on textured backgrounds) in COCO format.

Four shape classes that differ only by outline (colours and fills are drawn from one distribution
for every class), at COCO's small / medium / large scales, occluding each other. Used by the tests
and the demo config; a tiny K-Net trained for a few CPU minutes reaches a modest AP on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SYNTHETIC_CLASSES: tuple[str, ...] = ("disk", "square", "triangle", "ring")

# Target areas in pixels, chosen inside COCO's bins (small < 32^2 <= medium < 96^2 <= large) with
# margins so that the visible area after truncation and occlusion mostly stays in the drawn bin.
_AREA_RANGES = ((120.0, 900.0), (1100.0, 8500.0), (11000.0, 19000.0))
_BIN_PROBS = (0.4, 0.42, 0.18)
_MIN_VISIBLE_FRACTION = 0.3
_MIN_VISIBLE_PIXELS = 12
_ELLIPSE_VERTICES = 48


def write_synthetic_dataset(
    out: str | Path,
    *,
    num_images: int = 400,
    image_size: int = 160,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> dict[str, Path]:
    """Write the synthetic shapes dataset as PNG images and COCO instance jsons.

    Each image has a textured background (gradient or smoothed noise, optionally stripes or a
    checkerboard, unlabeled thin lines) and 2..8 shapes with random colour/texture fill, rotation
    and aspect. Later shapes occlude earlier ones; earlier masks keep only their visible part and
    an instance left with less than 30% of its drawn area or fewer than 12 pixels is removed.
    Annotations: ``iscrowd`` 0, compressed RLE segmentation (``counts`` a str), ``area`` the mask
    area, ``bbox`` [x, y, w, h] of the mask. The same arguments give byte-identical files.

    Args:
        out: output folder (``images/``, ``train.json``, ``val.json`` are written inside).
        num_images: total number of images, >= 2.
        image_size: side of the square images in pixels, >= 32 (at 160 all three COCO scale bins
            occur; smaller images cap the shape area at a fraction of the image).
        seed: seed of every random choice.
        val_fraction: share of the images (the last ones) that go to ``val.json``, in (0, 1).

    Returns:
        {"images": image folder, "train": train json, "val": val json}.
    """
    if num_images < 2:
        raise ValueError(f"num_images must be >= 2 (one train and one val image), got {num_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(num_images):
        pixels, instances = _render_image(rng, image_size)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        for class_index, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            counts = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_index + 1,
                    "segmentation": {"size": [image_size, image_size], "counts": counts},
                    "area": int(mask.sum()),
                    "bbox": [float(value) for value in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )

    num_val = min(num_images - 1, max(1, round(val_fraction * num_images)))
    val_ids = {image["id"] for image in images[num_images - num_val :]}
    categories = [
        {"id": index + 1, "name": name, "supercategory": "shape"}
        for index, name in enumerate(SYNTHETIC_CLASSES)
    ]
    paths = {"images": image_dir, "train": out / "train.json", "val": out / "val.json"}
    for split, keep_val in (("train", False), ("val", True)):
        content = {
            "info": {
                "description": f"sp-ray synthetic shapes ({split})",
                "seed": seed,
                "image_size": image_size,
                "num_images": num_images,
            },
            "licenses": [],
            "images": [image for image in images if (image["id"] in val_ids) == keep_val],
            "annotations": [ann for ann in annotations if (ann["image_id"] in val_ids) == keep_val],
            "categories": categories,
        }
        paths[split].write_text(json.dumps(content, separators=(",", ":")))
    return paths


def _render_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image uint8 [S, S, 3] and its visible instances as (class index, bool mask [S, S])."""
    canvas = _background(rng, size)
    shapes = _sample_shapes(rng, size)
    drawn: list[tuple[int, np.ndarray, int]] = []  # (class, visible mask, drawn area)
    for class_index, area in shapes:
        mask = _shape_mask(rng, SYNTHETIC_CLASSES[class_index], area, size)
        drawn_area = int(mask.sum())
        if drawn_area < _MIN_VISIBLE_PIXELS:
            continue
        fill = _texture(rng, size)
        canvas[mask] = fill[mask]
        for _, visible, _ in drawn:
            visible &= ~mask
        drawn.append((class_index, mask, drawn_area))
    noise_sigma = rng.uniform(0.0, 6.0)
    canvas = canvas + rng.normal(0.0, noise_sigma, canvas.shape)
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    instances = [
        (class_index, visible)
        for class_index, visible, drawn_area in drawn
        if visible.sum() >= max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * drawn_area)
    ]
    return pixels, instances


def _sample_shapes(rng: np.random.Generator, size: int) -> list[tuple[int, float]]:
    """(class index, target area) of 2..8 shapes, roughly largest first, at most one large one."""
    count = int(rng.integers(2, 9))
    cap = 0.6 * size * size
    shapes = []
    has_large = False
    for _ in range(count):
        scale_bin = int(rng.choice(3, p=_BIN_PROBS))
        if scale_bin == 2 and has_large:
            scale_bin = 1
        has_large = has_large or scale_bin == 2
        low, high = _AREA_RANGES[scale_bin]
        area = min(float(np.exp(rng.uniform(math.log(low), math.log(high)))), cap)
        shapes.append((int(rng.integers(len(SYNTHETIC_CLASSES))), area))
    # Big shapes first, with jitter, so that small shapes sit on top of big ones more often than not.
    jitter = rng.uniform(0.5, 1.5, size=count)
    order = np.argsort(-np.array([area for _, area in shapes]) * jitter, kind="stable")
    return [shapes[i] for i in order]


def _shape_mask(rng: np.random.Generator, name: str, area: float, size: int) -> np.ndarray:
    """bool [S, S] mask of one rotated shape whose area (before truncation by the border) is ``area``."""
    aspect = rng.uniform(0.75, 1.0)
    hole = rng.uniform(0.45, 0.65)
    unit_area = {
        "disk": math.pi,
        "square": 4.0,
        "triangle": 3.0 * math.sqrt(3.0) / 4.0,
        "ring": math.pi * (1.0 - hole**2),
    }[name]
    radius = math.sqrt(area / (unit_area * aspect))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    margin = min(0.85 * radius, size / 2)
    center = rng.uniform(margin, size - margin, size=2)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def place(points: np.ndarray) -> list[tuple[float, float]]:
        points = points * np.array([radius, radius * aspect])
        placed = points @ rotation.T + center  # (P, 2) as (x, y)
        return [(float(x), float(y)) for x, y in placed]

    if name == "square":
        outline = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    elif name == "triangle":
        corners = np.deg2rad([90.0, 210.0, 330.0])
        outline = np.stack([np.cos(corners), np.sin(corners)], axis=1)
    else:
        theta = np.linspace(0.0, 2.0 * math.pi, _ELLIPSE_VERTICES, endpoint=False)
        outline = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    draw.polygon(place(outline), fill=1)
    if name == "ring":
        draw.polygon(place(outline * hole), fill=0)
    return np.asarray(image, dtype=bool).copy()


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3)


def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(coords, coords)  # x, y each (S, S)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _unit_grid(size)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    t = math.cos(angle) * x + math.sin(angle) * y
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    first, second = _random_colour(rng), _random_colour(rng)
    return first + t[:, :, None] * (second - first)


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    cells = int(rng.integers(3, 9))
    coarse = rng.uniform(0.0, 255.0, size=(cells, cells, 3)).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float64)


def _pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stripes or a checkerboard of two random colours, at a random frequency and angle."""
    x, y = _unit_grid(size)
    angle = rng.uniform(0.0, math.pi)
    u = math.cos(angle) * x + math.sin(angle) * y
    v = -math.sin(angle) * x + math.cos(angle) * y
    frequency = rng.uniform(3.0, 14.0)
    if rng.random() < 0.5:
        on = np.sin(2.0 * math.pi * frequency * u) > 0
    else:
        on = (np.floor(frequency * u) + np.floor(frequency * v)) % 2 == 0
    return np.where(on[:, :, None], _random_colour(rng), _random_colour(rng))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float [S, S, 3] in 0..255: gradient or smooth noise, maybe a pattern, maybe unlabeled lines."""
    base = _gradient(rng, size) if rng.random() < 0.5 else _smooth_noise(rng, size)
    if rng.random() < 0.5:
        alpha = rng.uniform(0.25, 0.6)
        base = (1.0 - alpha) * base + alpha * _pattern(rng, size)
    if rng.random() < 0.5:
        alpha = rng.uniform(0.2, 0.5)
        base = (1.0 - alpha) * base + alpha * _smooth_noise(rng, size)
    image = Image.fromarray(np.clip(np.rint(base), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        ends = rng.uniform(0.0, size, size=4)
        colour = tuple(int(c) for c in _random_colour(rng))
        draw.line([(ends[0], ends[1]), (ends[2], ends[3])], fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(image, dtype=np.float64).copy()


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """float [S, S, 3] fill of one shape: solid, gradient, noisy or patterned; same law for all classes."""
    kind = rng.random()
    if kind < 0.35:
        fill = np.broadcast_to(_random_colour(rng), (size, size, 3)).astype(np.float64)
    elif kind < 0.65:
        fill = _gradient(rng, size)
    elif kind < 0.85:
        fill = _random_colour(rng) + rng.normal(0.0, 25.0, size=(size, size, 3))
    else:
        fill = _pattern(rng, size)
    return fill
