"""A small synthetic instance-segmentation dataset (textured shapes on textured backgrounds) in COCO format.

Four shape classes at COCO's small / medium / large scales, occluding each other. As in real images,
objects ("things") and background ("stuff") differ in appearance, and each class has a typical but
overlapping colour: fills are saturated colours around a hue of the class (solid with shading,
noisy, or a two-colour pattern), backgrounds are muted gradients or smooth noise with faint patterns
and unlabeled lines. A class is told apart by its outline and, less reliably, by its colour. Used by
the tests, the demo and the benchmarks.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Sequence
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
# Hue centre (HSV, 0..1) of each class's fills and the spread around it: neighbouring classes overlap,
# so colour is a cue to the class but not a rule. Objects are saturated, backgrounds muted.
_CLASS_HUES = (0.02, 0.3, 0.58, 0.8)
_HUE_SPREAD = 0.07
_OBJECT_SATURATION = (0.5, 1.0)
_BACKGROUND_SATURATION = (0.0, 0.3)


def write_synthetic_dataset(
    out: str | Path,
    *,
    num_images: int = 400,
    image_size: int = 160,
    seed: int = 0,
    val_fraction: float = 0.2,
    aspect_ratios: Sequence[float] = (),
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
            occur; smaller images cap the shape area at a fraction of the image); the long side of the
            others.
        seed: seed of every random choice.
        val_fraction: share of the images (the last ones) that go to ``val.json``, in (0, 1).
        aspect_ratios: width / height of the images, each image drawn uniformly from these (e.g. ``(4/3, 3/4)``
            for COCO's usual landscape and portrait); empty: all square. An image of ratio r is the centre
            crop of a square rendering to a long side of ``image_size`` and a short side of
            ``image_size / max(r, 1/r)``; an instance keeps its cropped mask if that still holds 30% of its
            visible pixels and at least 12. The choice of ratios has its own random stream: the square
            images of a seed are the same whatever the list.

    Returns:
        {"images": image folder, "train": train json, "val": val json}.
    """
    if num_images < 2:
        raise ValueError(f"num_images must be >= 2 (one train and one val image), got {num_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 pixels, got {image_size}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    bad_ratios = [r for r in aspect_ratios if not (math.isfinite(r) and r > 0)]
    if bad_ratios:
        raise ValueError(f"aspect ratios (width / height) must be positive numbers, got {bad_ratios}")
    out = Path(out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ratio_rng = np.random.default_rng([seed, 1])  # apart from `rng`, which draws what every image holds

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(num_images):
        pixels, instances = _render_image(rng, image_size)
        if aspect_ratios:
            ratio = float(aspect_ratios[int(ratio_rng.integers(len(aspect_ratios)))])
            pixels, instances = _centre_crop(pixels, instances, ratio)
        height, width = pixels.shape[:2]
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for class_index, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            counts = rle["counts"].decode("ascii")
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_index + 1,
                    "segmentation": {"size": [height, width], "counts": counts},
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


def _centre_crop(
    pixels: np.ndarray, instances: list[tuple[int, np.ndarray]], ratio: float
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """The centre crop of width / height ``ratio`` of a square image [S, S, 3] and of its instance masks; an
    instance stays if its crop keeps 30% of its pixels and at least 12."""
    size = pixels.shape[0]
    short = max(1, round(size / max(ratio, 1.0 / ratio)))
    height, width = (short, size) if ratio >= 1 else (size, short)
    top, left = (size - height) // 2, (size - width) // 2
    window = (slice(top, top + height), slice(left, left + width))
    kept = []
    for class_index, mask in instances:
        cropped = mask[window]
        if cropped.sum() >= max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * mask.sum()):
            kept.append((class_index, np.ascontiguousarray(cropped)))
    return np.ascontiguousarray(pixels[window]), kept


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
        fill = _texture(rng, size, class_index)
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


def _hsv_colour(hue: float, saturation: float, value: float) -> np.ndarray:
    return 255.0 * np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _object_colour(rng: np.random.Generator, class_index: int) -> np.ndarray:
    """A saturated RGB colour (0..255) near the hue of the class."""
    hue = rng.normal(_CLASS_HUES[class_index], _HUE_SPREAD)
    return _hsv_colour(hue, rng.uniform(*_OBJECT_SATURATION), rng.uniform(0.45, 1.0))


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A background RGB colour (0..255): any hue, low saturation."""
    return _hsv_colour(rng.uniform(), rng.uniform(*_BACKGROUND_SATURATION), rng.uniform(0.2, 0.9))


def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(coords, coords)  # x, y each (S, S)


def _gradient(rng: np.random.Generator, size: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    x, y = _unit_grid(size)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    t = math.cos(angle) * x + math.sin(angle) * y
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    return first + t[:, :, None] * (second - first)


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted colours on a coarse random grid, bicubically upsampled."""
    cells = int(rng.integers(3, 9))
    coarse = np.stack([_muted_colour(rng) for _ in range(cells * cells)]).reshape(cells, cells, 3)
    smooth = Image.fromarray(np.rint(coarse).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float64)


def _pattern(rng: np.random.Generator, size: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Stripes or a checkerboard of two colours, at a random frequency and angle."""
    x, y = _unit_grid(size)
    angle = rng.uniform(0.0, math.pi)
    u = math.cos(angle) * x + math.sin(angle) * y
    v = -math.sin(angle) * x + math.cos(angle) * y
    frequency = rng.uniform(3.0, 14.0)
    if rng.random() < 0.5:
        on = np.sin(2.0 * math.pi * frequency * u) > 0
    else:
        on = (np.floor(frequency * u) + np.floor(frequency * v)) % 2 == 0
    return np.where(on[:, :, None], first, second)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float [S, S, 3] in 0..255: muted gradient or smooth noise, maybe a faint pattern, maybe lines."""
    if rng.random() < 0.5:
        base = _gradient(rng, size, _muted_colour(rng), _muted_colour(rng))
    else:
        base = _smooth_noise(rng, size)
    if rng.random() < 0.5:
        alpha = rng.uniform(0.1, 0.35)
        base = (1.0 - alpha) * base + alpha * _pattern(rng, size, _muted_colour(rng), _muted_colour(rng))
    image = Image.fromarray(np.clip(np.rint(base), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        ends = rng.uniform(0.0, size, size=4)
        colour = tuple(int(c) for c in _muted_colour(rng))
        draw.line([(ends[0], ends[1]), (ends[2], ends[3])], fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(image, dtype=np.float64).copy()


def _texture(rng: np.random.Generator, size: int, class_index: int) -> np.ndarray:
    """float [S, S, 3] fill of one shape of the class: shaded solid, noisy, or a two-colour pattern."""
    colour = _object_colour(rng, class_index)
    kind = rng.random()
    if kind < 0.5:
        fill = _gradient(rng, size, colour, colour * rng.uniform(0.55, 0.9))
    elif kind < 0.8:
        fill = colour + rng.normal(0.0, 20.0, size=(size, size, 3))
    else:
        fill = _pattern(rng, size, colour, _object_colour(rng, class_index))
    return fill
