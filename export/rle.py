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
