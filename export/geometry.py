"""Size arithmetic of the inference resize and of padding, in plain Python (no numpy, no torch).

The runtime must resize exactly as training's evaluation transform does, so the rule lives here,
free of torch, and ``sp_ray.data.transforms`` re-exports it. ``tests/export/test_geometry.py``
checks it against ``torchvision.transforms.v2.Resize`` on a wide grid of sizes.
"""

from __future__ import annotations

import math

# Largest image (H x W pixels) that sp-ray reads or segments, unless told otherwise. It is PIL's own
# decompression-bomb threshold (``PIL.Image.MAX_IMAGE_PIXELS``, 1024**3 // 4 // 3, about 9459 x 9459),
# so the two guards agree: every image PIL would warn about is refused by sp-ray's limit, and every
# image within it opens silently. That is 10.8 times a 4K frame; at the limit the runtime holds the
# image (3 bytes a pixel), one box at a time in float32, and its dense masks (1 byte a pixel per
# instance), which stays within a 24 GB machine for the usual top-100 detections of objects, where the
# full-image resampling it replaces needed 12+ bytes a pixel per instance (19 GB at 4000 x 4000).
MAX_IMAGE_PIXELS = 89_478_485


def check_pixel_count(height: int, width: int, *, limit: int, what: str, setting: str) -> None:
    """Raise ValueError when an image of height x width pixels exceeds ``limit``.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        limit: the largest allowed height * width.
        what: the image, for the message (a path, "image 3").
        setting: how the user raises the limit, for the message.

    Raises:
        ValueError: height * width > limit; the message gives both and says what to do.
    """
    if height * width > limit:
        raise ValueError(
            f"{what}: {height}x{width} (HxW) is {height * width:,} pixels, more than the limit of {limit:,}; "
            f"downscale the image, or raise {setting} if this machine has the memory"
        )


def resize_for_inference(h: int, w: int, *, max_size: int, short_size: int) -> tuple[int, int]:
    """Output size of the evaluation resize (mmdet keep-ratio rule with torchvision's truncation).

    The short side becomes ``short_size`` unless the long side would then exceed ``max_size``, in
    which case the long side becomes ``max_size``; products are truncated by ``int`` as
    ``torchvision.transforms.v2.Resize(size=short_size, max_size=max_size)`` does. When
    ``max_size <= short_size`` the long-side cap always binds.

    Args:
        h: input height in pixels.
        w: input width in pixels.
        max_size: cap on the long side.
        short_size: target of the short side.

    Returns:
        (H, W) of the resized image.
    """
    if max_size <= 0 or short_size <= 0:
        raise ValueError(f"max_size and short_size must be positive, got {max_size} and {short_size}")
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got h={h}, w={w}")
    short, long = (w, h) if w <= h else (h, w)
    if max_size <= short_size:
        new_short, new_long = int(max_size * short / long), max_size
    else:
        new_short, new_long = short_size, int(short_size * long / short)
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    if new_short == 0:
        raise ValueError(
            f"an image of {h}x{w} (HxW) is too elongated for max_size={max_size}: its short side would be 0"
        )
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


def fit_within(h: int, w: int, *, max_h: int, max_w: int) -> tuple[int, int]:
    """Shrink (H, W) keeping the aspect ratio until it fits in (max_h, max_w); unchanged if it fits.

    Used for fixed-size graphs only, when the training resize of an image does not fit the graph's input.

    Args:
        h: height after the training resize.
        w: width after the training resize.
        max_h: input height of the graph.
        max_w: input width of the graph.

    Returns:
        (H', W') with H' <= max_h, W' <= max_w, both >= 1.
    """
    if h <= max_h and w <= max_w:
        return h, w
    scale = min(max_h / h, max_w / w)
    return max(1, min(max_h, int(h * scale))), max(1, min(max_w, int(w * scale)))


def padded_size(sizes: list[tuple[int, int]], *, size_divisor: int) -> tuple[int, int]:
    """The batch size of a collate: the largest H and W, each rounded up to a multiple of ``size_divisor``.

    Args:
        sizes: (H, W) of every image of the batch.
        size_divisor: padded sides are multiples of this (>= 1).

    Returns:
        (Hp, Wp).
    """
    if not sizes:
        raise ValueError("padded_size needs at least one image size")
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    return math.ceil(height / size_divisor) * size_divisor, math.ceil(width / size_divisor) * size_divisor
