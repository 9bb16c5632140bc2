"""Resize / flip / rotate transforms on (image, target) pairs, the inference resize rule, and batch collation."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from export.geometry import resize_for_inference
from sp_ray.types import Target

__all__ = ["RandomRotate", "RandomScaleResize", "build_transforms", "collate", "mask_boxes", "resize_for_inference"]


class RefreshSizeAndBoxes:
    """Last step of `build_transforms`: refreshes ``image_size`` and ``boxes`` from the transformed data.

    ``image_size`` becomes the image's current (H, W). ``boxes`` become the tight extents of the
    transformed masks again: nearest-neighbour resizing can drop a one-pixel tip of a mask (the
    end of a disc, a thin spike), and the scaled box then sticks out of the mask by more than a
    pixel; the dataset defines boxes as mask extents, so they are re-derived rather than scaled.
    """

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        height, width = int(image.shape[-2]), int(image.shape[-1])
        masks = target["masks"].as_subclass(Tensor)
        boxes = tv_tensors.BoundingBoxes(mask_boxes(masks), format="XYXY", canvas_size=(height, width))
        return image, Target(**{**target, "boxes": boxes, "image_size": (height, width)})


def _keep_ratio_resize(*, max_size: int, short_size: int) -> v2.Resize:
    if max_size <= short_size:
        return v2.Resize(size=None, max_size=max_size, antialias=True)
    return v2.Resize(size=short_size, max_size=max_size, antialias=True)


class RandomScaleResize:
    """Keep-ratio resize with both sizes multiplied by a factor drawn uniformly from ``scale_range``.

    mmdet's multi-scale training in "range" mode: a cheap augmentation that makes a model trained on
    few images see each object at many sizes. The factor comes from torch's global RNG, so it
    follows the training loop's per-epoch seeding.
    """

    def __init__(self, *, max_size: int, short_size: int, scale_range: tuple[float, float]) -> None:
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.max_size, self.short_size, self.low, self.high = max_size, short_size, low, high

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        factor = self.low + (self.high - self.low) * float(torch.rand(()))
        resize = _keep_ratio_resize(
            max_size=max(32, round(self.max_size * factor)), short_size=max(32, round(self.short_size * factor))
        )
        return resize(image, target)


MAX_ROTATE_LEVEL = 10  # mmdet's _MAX_LEVEL of its AutoAugment-style transforms
MAX_ROTATE_ANGLE = 30.0  # degrees at level 10 (mmdet Rotate's max_rotate_angle)
ROTATE_IMAGE_FILL = 128  # the value of the pixels a rotation brings in (mmdet Rotate's img_fill_val)


class RandomRotate:
    """mmdet 2.x ``Rotate(level)``: with probability ``prob``, rotate image and masks about the image centre.

    The angle is ``level / 10 * max_angle`` degrees (level 3: 9 degrees), its sign drawn with probability 0.5
    each; scale 1, the canvas keeps its size (corners leave it). The image is sampled bilinearly and the area
    the rotation brings in is ``image_fill`` (128, mid grey) in every channel; masks are sampled with nearest
    neighbour and filled with False, and boxes are re-derived from the rotated masks (tight extents, as
    everywhere in the data pipeline, rather than mmdet's box of the rotated box corners). An instance rotated
    out of the canvas keeps an empty mask here; `CocoInstanceDataset` drops it and counts it under
    ``empty after transforms``. Both draws come from torch's global RNG, like `RandomScaleResize`, so they
    follow the training loop's per-epoch seeding and the DataLoader's per-worker seeds.

    Args:
        level: magnitude in [0, 10]; 0 never rotates.
        prob: probability of rotating an item, in [0, 1] (mmdet's default 0.5).
        max_angle: the angle of level 10, in degrees.
        image_fill: value of the pixels outside the rotated image, in 0..255.
    """

    def __init__(
        self,
        *,
        level: float,
        prob: float = 0.5,
        max_angle: float = MAX_ROTATE_ANGLE,
        image_fill: float = ROTATE_IMAGE_FILL,
    ) -> None:
        if not 0 <= level <= MAX_ROTATE_LEVEL:
            raise ValueError(f"rotate level must be in [0, {MAX_ROTATE_LEVEL}], got {level}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"rotate probability must be in [0, 1], got {prob}")
        if not 0 <= image_fill <= 255:
            raise ValueError(f"rotate image fill must be in [0, 255], got {image_fill}")
        self.angle = level / MAX_ROTATE_LEVEL * max_angle
        self.prob = prob
        self.image_fill = float(image_fill)

    def draw_angle(self) -> float | None:
        """The signed angle in degrees (counter-clockwise positive) of the next item, or None: not rotated."""
        if self.angle == 0 or float(torch.rand(())) >= self.prob:
            return None
        return -self.angle if float(torch.rand(())) < 0.5 else self.angle

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        angle = self.draw_angle()
        if angle is None:
            return image, target
        rotated = TF.rotate(
            image, angle, interpolation=v2.InterpolationMode.BILINEAR, fill=[self.image_fill] * int(image.shape[-3])
        )
        masks = TF.rotate(target["masks"], angle, interpolation=v2.InterpolationMode.NEAREST, fill=[0.0])
        height, width = int(rotated.shape[-2]), int(rotated.shape[-1])
        boxes = tv_tensors.BoundingBoxes(
            mask_boxes(masks.as_subclass(Tensor)), format="XYXY", canvas_size=(height, width)
        )
        return rotated, Target(**{**target, "masks": masks, "boxes": boxes})


def build_transforms(
    *,
    train: bool,
    max_size: int,
    short_size: int,
    flip_prob: float = 0.5,
    scale_range: tuple[float, float] = (1.0, 1.0),
    rotate_level: float = 0.0,
    rotate_prob: float = 0.5,
) -> v2.Compose:
    """Transforms for `CocoInstanceDataset` items: keep-ratio resize, horizontal flip and rotation when training.

    Masks (``tv_tensors.Mask``) are resized with nearest neighbour and stay bool; boxes
    (``tv_tensors.BoundingBoxes``) go through v2 with the image and are then re-derived from the
    masks by `RefreshSizeAndBoxes`, so they equal the mask extents exactly.

    Args:
        train: add a random horizontal flip with probability ``flip_prob``.
        max_size: cap on the long side (1333 for COCO).
        short_size: target of the short side (800 for COCO).
        flip_prob: flip probability, in [0, 1].
        scale_range: when training, both sizes are multiplied by a random factor in this range
            (``RandomScaleResize``); (1, 1) keeps the fixed resize.
        rotate_level: when training and > 0, mmdet's ``Rotate(level)`` after the flip (`RandomRotate`:
            +-level x 3 degrees, with probability ``rotate_prob``); the reference's K-Net COCO fine-tuning
            uses level 3.
        rotate_prob: probability of that rotation, in [0, 1].

    Returns:
        a callable ``(image, target) -> (image, target)``; the output size is
        `resize_for_inference` of the input size.
    """
    _check_sizes(max_size=max_size, short_size=short_size)
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    if train and tuple(scale_range) != (1.0, 1.0):
        resize: Any = RandomScaleResize(max_size=max_size, short_size=short_size, scale_range=tuple(scale_range))
    else:
        resize = _keep_ratio_resize(max_size=max_size, short_size=short_size)
    steps: list[Any] = [resize]
    if train and flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_prob))
    if train and rotate_level > 0:
        steps.append(RandomRotate(level=rotate_level, prob=rotate_prob))
    steps.append(RefreshSizeAndBoxes())
    return v2.Compose(steps)


def collate(batch: list[tuple[Tensor, Target]], *, size_divisor: int = 32) -> tuple[Tensor, list[Target]]:
    """Pad a list of dataset items to one batch.

    Every image is padded at the bottom/right with 0 to the batch's largest H and W, rounded up
    to a multiple of ``size_divisor`` (the stride the FPN needs); masks are padded the same way.
    ``image_size`` keeps the valid (unpadded) region. Use ``functools.partial(collate,
    size_divisor=32)`` as a DataLoader ``collate_fn``.

    Args:
        batch: B items ``(image uint8 [3, H_b, W_b], target)`` with target masks bool [K_b, H_b, W_b].
        size_divisor: padded sizes are multiples of this.

    Returns:
        images uint8 [B, 3, Hp, Wp] and the B targets with plain tensors (tv_tensor subclasses
        removed): masks bool [K_b, Hp, Wp], boxes float32 [K_b, 4] XYXY, labels int64 [K_b],
        queries [K_b, C] when the items have them, and image uint8 [3, Hp, Wp]: a view of the padded
        image in the batch (no copy; FreeSOLO's colour-affinity loss reads the pixels from the target).
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    height = max(int(image.shape[-2]) for image, _ in batch)
    width = max(int(image.shape[-1]) for image, _ in batch)
    padded_h = math.ceil(height / size_divisor) * size_divisor
    padded_w = math.ceil(width / size_divisor) * size_divisor
    images = []
    targets: list[Target] = []
    for image, target in batch:
        image = image.as_subclass(Tensor)
        pad = (0, padded_w - image.shape[-1], 0, padded_h - image.shape[-2])
        images.append(F.pad(image, pad, value=0))
        masks = target["masks"].as_subclass(Tensor)
        padded = Target(
            labels=target["labels"].as_subclass(Tensor),
            masks=F.pad(masks, pad, value=False),
            boxes=target["boxes"].as_subclass(Tensor),
            image_id=target["image_id"],
            orig_size=target["orig_size"],
            image_size=target["image_size"],
        )
        if "queries" in target:
            padded["queries"] = target["queries"]
        targets.append(padded)
    stacked = torch.stack(images)
    for target, image in zip(targets, stacked, strict=True):
        target["image"] = image
    return stacked, targets


def mask_boxes(masks: Tensor) -> Tensor:
    """Tight boxes around masks, on pixel boundaries (COCO's convention: x2 = last column + 1).

    Args:
        masks: bool [K, H, W].

    Returns:
        float32 [K, 4] XYXY; an empty mask gets (0, 0, 0, 0).
    """
    height, width = masks.shape[-2:]
    rows = masks.any(dim=2).to(torch.uint8)  # (K, H)
    cols = masks.any(dim=1).to(torch.uint8)  # (K, W)
    y1 = rows.argmax(dim=1)
    y2 = height - rows.flip(1).argmax(dim=1)
    x1 = cols.argmax(dim=1)
    x2 = width - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32)
    nonempty = rows.any(dim=1, keepdim=True)
    return boxes * nonempty


def _check_sizes(*, max_size: int, short_size: int) -> None:
    if max_size <= 0 or short_size <= 0:
        raise ValueError(f"max_size and short_size must be positive, got {max_size} and {short_size}")
