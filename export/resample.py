"""Image and mask resampling in numpy, matching what training and PyTorch post-processing compute.

- ``resize_image``: torchvision's antialiased bilinear resize of uint8 images (the evaluation
  transform), reproduced to the bit: the separable PIL-style triangle filter stretched by the
  downscale factor, int16 fixed-point weights, horizontal pass then vertical pass, each rounded to uint8.
- ``resize_mask_logits``: ``sp_ray.models.postprocess.resize_mask_logits`` (crop the valid cells of
  stride-s logits, bilinear resampling to the original size).
- ``paste_masks``: torchvision's ``paste_masks_in_image`` (Mask R-CNN's 28 x 28 masks into their boxes).
- ``masks_to_boxes``: tight boxes around boolean masks, x2/y2 exclusive.
"""

from __future__ import annotations

import math

import numpy as np

# PIL / torch: fixed-point weights are int16 with at most 22 fractional bits (32 - 8 - 2).
_MAX_PRECISION = 22


def _antialias_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices and fixed-point weights of the antialiased bilinear filter along one axis.

    Returns:
        (indices int64 [out, T], weights int32 [out, T], precision bits).
    """
    scale = in_size / out_size
    support = max(scale, 1.0)  # the triangle filter (support 1) is stretched when downscaling
    centres = (np.arange(out_size) + 0.5) * scale
    first = np.maximum((centres - support + 0.5).astype(np.int64), 0)
    stop = np.minimum((centres + support + 0.5).astype(np.int64), in_size)
    taps = int((stop - first).max())
    offsets = np.arange(taps)
    index = first[:, None] + offsets[None]  # (out, T)
    weights = np.clip(1.0 - np.abs((index - centres[:, None] + 0.5) / support), 0.0, None)
    weights = np.where(offsets[None] < (stop - first)[:, None], weights, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    w_max = weights.max()
    precision = 0
    while precision < _MAX_PRECISION and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    fixed = np.floor(weights * (1 << precision) + 0.5).astype(np.int32)
    return np.minimum(index, in_size - 1), fixed, precision


def _resample_axis(image: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    in_size = image.shape[axis]
    index, weights, precision = _antialias_taps(in_size, out_size)
    shape = [1] * image.ndim
    shape[axis] = out_size
    acc = np.full(image.shape[:axis] + (out_size,) + image.shape[axis + 1 :], 1 << (precision - 1), np.int32)
    for t in range(index.shape[1]):
        acc += np.take(image, index[:, t], axis=axis).astype(np.int32) * weights[:, t].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of a uint8 image, equal to ``torchvision.transforms.v2.Resize``.

    Args:
        image: uint8 [H, W, C].
        size: (H', W').

    Returns:
        uint8 [H', W', C].
    """
    out_h, out_w = size
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"resize_image: output size must be positive, got {size}")
    out = image
    if out_w != image.shape[1]:
        out = _resample_axis(out, 1, out_w)
    if out_h != image.shape[0]:
        out = _resample_axis(out, 0, out_h)
    return out


def _linear_taps(positions: np.ndarray, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-tap linear interpolation at float source positions (clamped to [0, in_size - 1])."""
    pos = np.clip(positions, 0, in_size - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (pos - low).astype(np.float32)


def resize_mask_logits(
    mask_logits: np.ndarray, *, image_size: tuple[int, int], orig_size: tuple[int, int], mask_stride: int
) -> np.ndarray:
    """Crop stride-s mask logits to the valid input region and resample them to the original size.

    Same arithmetic as ``sp_ray.models.postprocess.resize_mask_logits``: original pixel centres map
    to input pixels, then to cell centres of the mask map, clamped to the ceil(H / s) x ceil(W / s)
    cells that hold valid pixels, and are interpolated bilinearly (separably: rows, then columns).

    Args:
        mask_logits: float [K, h, w] covering the padded input (h * s, w * s).
        image_size: (H, W), the valid region of the input.
        orig_size: (H0, W0), the image's original size.
        mask_stride: s.

    Returns:
        float32 [K, H0, W0] logits.
    """
    k, h, w = mask_logits.shape
    valid_h, valid_w = image_size
    out_h, out_w = orig_size
    if not (0 < valid_h <= h * mask_stride and 0 < valid_w <= w * mask_stride):
        raise ValueError(
            f"image_size {image_size} must lie inside the padded input {(h * mask_stride, w * mask_stride)}"
        )

    def positions(out_size: int, valid: int) -> np.ndarray:
        centres = (np.arange(out_size, dtype=np.float32) + 0.5) * np.float32(valid / out_size)
        return np.clip(centres / mask_stride - 0.5, 0, math.ceil(valid / mask_stride) - 1)

    y0, y1, wy = _linear_taps(positions(out_h, valid_h), h)
    x0, x1, wx = _linear_taps(positions(out_w, valid_w), w)
    logits = mask_logits.astype(np.float32, copy=False)
    rows = logits[:, y0, :] * (1 - wy)[None, :, None] + logits[:, y1, :] * wy[None, :, None]  # (K, H0, w)
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx  # (K, H0, W0)


def paste_masks(
    mask_probs: np.ndarray, boxes: np.ndarray, *, out_size: tuple[int, int], padding: int = 1
) -> np.ndarray:
    """Paste M x M box masks into full images, as torchvision's ``paste_masks_in_image``.

    Each mask gets ``padding`` cells of zeros on every side and its box is enlarged by the same
    factor (M + 2 padding) / M around its centre and truncated to integers; the padded mask is
    resized bilinearly (``align_corners=False``) to the box size (x2 - x1 + 1) x (y2 - y1 + 1) and
    the part inside the image is written.

    Args:
        mask_probs: float [K, M, M] probabilities.
        boxes: float [K, 4] xyxy in output pixels.
        out_size: (H0, W0).
        padding: cells added on each side.

    Returns:
        float32 [K, H0, W0].
    """
    out_h, out_w = out_size
    k = mask_probs.shape[0]
    result = np.zeros((k, out_h, out_w), np.float32)
    if k == 0:
        return result
    m = mask_probs.shape[-1]
    padded = np.pad(mask_probs.astype(np.float32), ((0, 0), (padding, padding), (padding, padding)))
    side = m + 2 * padding
    scale = np.float32(side / m)
    boxes = boxes.astype(np.float32)
    half_w = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
    centre_x = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    centre_y = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    expanded = np.stack(
        [centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], axis=1
    ).astype(np.int64)  # truncation toward zero, as torch's .to(int64)
    for i, (bx0, by0, bx1, by1) in enumerate(expanded.tolist()):
        box_w, box_h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        x_0, x_1 = max(bx0, 0), min(bx1 + 1, out_w)
        y_0, y_1 = max(by0, 0), min(by1 + 1, out_h)
        if x_1 <= x_0 or y_1 <= y_0:
            continue
        rows = _interp_matrix(np.arange(y_0 - by0, y_1 - by0), side, box_h)  # (rows, side)
        cols = _interp_matrix(np.arange(x_0 - bx0, x_1 - bx0), side, box_w)  # (cols, side)
        result[i, y_0:y_1, x_0:x_1] = rows @ padded[i] @ cols.T
    return result


def _interp_matrix(dst: np.ndarray, in_size: int, out_size: int) -> np.ndarray:
    """Rows of the bilinear (align_corners=False) resampling matrix from in_size to out_size, at ``dst``."""
    source = np.maximum((dst.astype(np.float32) + 0.5) * np.float32(in_size / out_size) - 0.5, 0)
    low, high, frac = _linear_taps(source, in_size)
    matrix = np.zeros((len(dst), in_size), np.float32)
    np.add.at(matrix, (np.arange(len(dst)), low), 1 - frac)
    np.add.at(matrix, (np.arange(len(dst)), high), frac)
    return matrix


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes around boolean masks.

    Args:
        masks: bool [K, H, W].

    Returns:
        float32 [K, 4] xyxy, x2 / y2 exclusive (last column / row + 1); all zeros for an empty mask.
    """
    k, height, width = masks.shape
    rows = masks.any(axis=2)  # (K, H)
    cols = masks.any(axis=1)  # (K, W)
    y1 = rows.argmax(axis=1)
    y2 = height - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = width - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    return boxes * rows.any(axis=1, keepdims=True)
