"""Instances drawn on images and images tiled into panels (numpy + PIL only).

Images are uint8 [H, W, 3] RGB, masks bool [K, H, W] at the image's size. Colours come from a fixed
palette by instance index, so the same drawing code gives the same picture on every run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours (Tableau 10 and its lighter half), cycled for more instances.
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141),
    (158, 218, 229), (199, 199, 199),
], dtype=np.uint8)  # fmt: skip


def instance_colors(count: int) -> np.ndarray:
    """uint8 [count, 3]: the palette, cycled."""
    return PALETTE[np.arange(count) % len(PALETTE)]


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """bool [H, W]: the pixels of ``mask`` with a 4-neighbour outside it (or on the image border)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay_masks(
    image: np.ndarray, masks: np.ndarray, *, colors: np.ndarray | None = None, alpha: float = 0.5
) -> np.ndarray:
    """Blend each mask's colour into the image and draw its outline in full colour.

    Args:
        image: uint8 [H, W, 3].
        masks: bool [K, H, W]; later masks are drawn over earlier ones.
        colors: uint8 [K, 3] (default: `instance_colors`).
        alpha: weight of the colour inside a mask, in [0, 1].

    Returns:
        uint8 [H, W, 3], a new array.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be [K, H, W] with H, W = {image.shape[:2]}, got {masks.shape}")
    colors = instance_colors(len(masks)) if colors is None else colors
    out = image.astype(np.float32)
    for mask, color in zip(masks.astype(bool), colors, strict=True):
        out[mask] = (1 - alpha) * out[mask] + alpha * color.astype(np.float32)
        out[mask_outline(mask)] = color
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer ``factor`` (pixels stay crisp in small images)."""
    if factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def draw_labels(
    image: np.ndarray, anchors: Sequence[tuple[float, float]], texts: Sequence[str], colors: np.ndarray
) -> np.ndarray:
    """Write each text on a filled box of its colour, top-left corner at its (x, y) anchor (clipped inside)."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for (x, y), text, color in zip(anchors, texts, colors, strict=True):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        width, height = right - left + 4, bottom - top + 3
        x0 = int(min(max(0, x), max(0, image.shape[1] - width)))
        y0 = int(min(max(0, y), max(0, image.shape[0] - height)))
        draw.rectangle((x0, y0, x0 + width, y0 + height), fill=tuple(int(c) for c in color))
        draw.text((x0 + 2 - left, y0 + 1 - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def tile(
    rows: Sequence[Sequence[np.ndarray]], *, column_titles: Sequence[str] = (), pad: int = 6,
    background: int = 255,
) -> np.ndarray:
    """Lay out panels in a grid, each cell as large as the largest panel, with a title row on top.

    Args:
        rows: panels uint8 [h, w, 3], row by row; rows may have different lengths.
        column_titles: one title per column (drawn above the first row), or none.
        pad: pixels between cells and around the grid.
        background: grey level of the gaps.

    Returns:
        uint8 [H, W, 3].
    """
    if not rows or not any(rows):
        raise ValueError("tile needs at least one panel")
    columns = max(len(row) for row in rows)
    cell_h = max(panel.shape[0] for row in rows for panel in row)
    cell_w = max(panel.shape[1] for row in rows for panel in row)
    title_h = 16 if column_titles else 0
    height = pad + title_h + len(rows) * (cell_h + pad)
    width = pad + columns * (cell_w + pad)
    canvas = np.full((height, width, 3), background, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            y, x = pad + title_h + r * (cell_h + pad), pad + c * (cell_w + pad)
            canvas[y : y + panel.shape[0], x : x + panel.shape[1]] = panel
    if column_titles:
        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default()
        for c, title in enumerate(column_titles[:columns]):
            draw.text((pad + c * (cell_w + pad), pad), title, fill=(0, 0, 0), font=font)
        canvas = np.asarray(image).copy()
    return canvas


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write uint8 [H, W, 3] as PNG (beside its destination, then renamed); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)
    return path
