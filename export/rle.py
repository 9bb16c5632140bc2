"""COCO run-length encoding of binary masks in numpy (the compressed string form of pycocotools).

Kept dependency-free so the runtime needs numpy and onnxruntime only; ``tests/export/test_rle.py``
checks it against ``pycocotools.mask.encode`` / ``decode``.
"""

from __future__ import annotations

import numpy as np


def _runs(mask: np.ndarray) -> list[int]:
    """Alternating run lengths (zeros first) of a mask read in column-major order, as COCO stores it."""
    flat = mask.ravel(order="F").astype(bool)
    if flat.size == 0:
        return [0]
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def _counts_to_string(counts: list[int]) -> str:
    """pycocotools' ``rleToString``: deltas against the run two back, 5 bits per char, offset by 48."""
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def _string_to_counts(text: str) -> list[int]:
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        x, shift, more = 0, 0, True
        while more:
            c = ord(text[pos]) - 48
            x |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and c & 0x10:
                x |= -1 << (5 * shift)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode_rle(mask: np.ndarray) -> dict[str, object]:
    """Encode one binary mask as COCO compressed RLE.

    Args:
        mask: bool or 0/1 [H, W].

    Returns:
        {"size": [H, W], "counts": str}, as ``pycocotools.mask.encode`` with ``counts`` decoded to str.
    """
    if mask.ndim != 2:
        raise ValueError(f"encode_rle expects one mask [H, W], got shape {mask.shape}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _counts_to_string(_runs(mask))}


def encode_rle_box(mask: np.ndarray, *, top: int, left: int, size: tuple[int, int]) -> dict[str, object]:
    """COCO compressed RLE of an H x W mask that is False outside one box, from the box's pixels only.

    COCO reads masks column by column. Within a box column the runs are those of the crop's column;
    between two box columns lie only False pixels. So each crop column, with one False pixel added
    above and below, gives the changes of value at their image positions (column-major index
    (left + c) * H + top + r); a change where one column's run meets the next column's (a box as tall
    as the image) appears twice at the same position and cancels, and one at the image's end is none.

    Args:
        mask: bool [h, w], the box's pixels.
        top: the box's first row in the image.
        left: the box's first column in the image.
        size: (H, W) of the image.

    Returns:
        {"size": [H, W], "counts": str}, equal to ``encode_rle`` of the full mask.
    """
    height, width = size
    h, w = mask.shape
    if not (0 <= top and top + h <= height and 0 <= left and left + w <= width):
        raise ValueError(f"encode_rle_box: a {h}x{w} box at row {top}, column {left} lies outside {height}x{width}")
    padded = np.zeros((w, h + 2), bool)
    padded[:, 1:-1] = mask.T
    flat = padded.ravel()
    index = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # flat position where a new run starts
    column, row = np.divmod(index, h + 2)
    changes = (left + column) * height + top + row - 1
    repeated = np.flatnonzero(changes[1:] == changes[:-1])
    if len(repeated):
        changes = np.delete(changes, np.concatenate([repeated, repeated + 1]))
    changes = changes[changes < height * width]  # a run that ends with the image ends no run
    runs = np.diff(np.concatenate(([0], changes, [height * width]))).tolist()
    return {"size": [int(height), int(width)], "counts": _counts_to_string(runs)}


def decode_rle(rle: dict[str, object]) -> np.ndarray:
    """Decode a COCO compressed RLE (``counts`` str or bytes) to bool [H, W]."""
    height, width = rle["size"]
    counts = rle["counts"]
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs = _string_to_counts(text) if isinstance(text, str) else list(text)
    if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, the mask has {height * width}")
    values = np.zeros(len(runs), bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape((height, width), order="F")
