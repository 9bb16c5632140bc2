"""Unlabeled images for self-supervised pre-training and DenseCL's two-view augmentation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T

from sp_ray.config import SSLConfig
from sp_ray.data.images import list_image_files, load_image_rgb

log = logging.getLogger("sp_ray")

# The blur radii of the config are for 224 px crops (MoCo-v2); smaller crops get proportionally less.
_REFERENCE_SIZE = 224


class UnlabeledImageFolder(Dataset):
    """The images of a folder tree, decoded to RGB as displayed and passed through ``transform``.

    A file that cannot be decoded is skipped (the next file is used instead) with a warning that
    names it and counts the files skipped so far in this process.

    Args:
        root: folder searched recursively (see ``sp_ray.data.images.list_image_files``).
        transform: called on a PIL RGB image; its result is the item.
    """

    def __init__(self, root: str | Path, *, transform: Callable[[Image.Image], Any]) -> None:
        self.root = Path(root)
        self.files = list_image_files(self.root)
        self.transform = transform
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        for offset in range(len(self.files)):
            path = self.files[(index + offset) % len(self.files)]
            try:
                pixels = load_image_rgb(path)
            except OSError as err:
                self.skipped += 1
                log.warning("skipping unreadable image (%d skipped so far): %s", self.skipped, err)
                continue
            return self.transform(Image.fromarray(pixels))
        raise OSError(f"none of the {len(self.files)} images under {self.root} could be decoded")


class RandomGaussianBlur:
    """PIL Gaussian blur with probability ``p`` and a radius drawn uniformly from ``sigma`` (MoCo-v2).

    Draws come from torch's generator, so DataLoader worker seeding makes them reproducible.
    """

    def __init__(self, *, p: float, sigma: tuple[float, float]) -> None:
        if not 0 <= sigma[0] <= sigma[1]:
            raise ValueError(f"blur sigma range must satisfy 0 <= min <= max, got {sigma}")
        self.p = p
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()).item() >= self.p:
            return image
        radius = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * torch.rand(()).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


class TwoViewTransform:
    """Two independent MoCo-v2 / DenseCL augmentations of one image.

    Random resized crop, colour jitter (with probability), grayscale, Gaussian blur, horizontal flip,
    in the official order. Pixels stay uint8 0..255; the model normalises.

    Args:
        image_size: side of the square output crops.
        crop_scale_min: smallest crop area as a fraction of the image (the largest is 1).
        jitter_prob: probability of colour jitter.
        brightness, contrast, saturation, hue: colour jitter strengths (torchvision semantics).
        grayscale_prob: probability of converting to grayscale (kept 3-channel).
        blur_prob: probability of a Gaussian blur.
        blur_sigma: (min, max) blur radius in pixels at 224 px, scaled by ``image_size / 224``.
        flip_prob: probability of a horizontal flip.
    """

    def __init__(
        self,
        *,
        image_size: int,
        crop_scale_min: float,
        jitter_prob: float,
        brightness: float,
        contrast: float,
        saturation: float,
        hue: float,
        grayscale_prob: float,
        blur_prob: float,
        blur_sigma: tuple[float, float],
        flip_prob: float,
    ) -> None:
        if image_size < 32:
            raise ValueError(f"ssl.image_size must be >= 32 (the ResNet stride), got {image_size}")
        if not 0 < crop_scale_min <= 1:
            raise ValueError(f"ssl.crop_scale_min must be in (0, 1], got {crop_scale_min}")
        for name, p in (("jitter_prob", jitter_prob), ("grayscale_prob", grayscale_prob),
                        ("blur_prob", blur_prob), ("flip_prob", flip_prob)):
            if not 0 <= p <= 1:
                raise ValueError(f"ssl.{name} must be a probability in [0, 1], got {p}")
        scale = image_size / _REFERENCE_SIZE
        self.augment = T.Compose([
            T.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0)),
            T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_prob),
            T.RandomGrayscale(p=grayscale_prob),
            RandomGaussianBlur(p=blur_prob, sigma=(blur_sigma[0] * scale, blur_sigma[1] * scale)),
            T.RandomHorizontalFlip(p=flip_prob),
            T.PILToTensor(),
        ])

    def __call__(self, image: Image.Image) -> Tensor:
        """Two views of ``image``.

        Args:
            image: PIL RGB image of any size.

        Returns:
            uint8 [2, 3, image_size, image_size]: (query view, key view).
        """
        return torch.stack([self.augment(image), self.augment(image)])


def build_two_view_transform(cfg: SSLConfig) -> TwoViewTransform:
    """The two-view augmentation described by the ``ssl`` config section."""
    if len(cfg.blur_sigma) != 2:
        raise ValueError(f"ssl.blur_sigma must be [min, max], got {cfg.blur_sigma}")
    return TwoViewTransform(
        image_size=cfg.image_size, crop_scale_min=cfg.crop_scale_min, jitter_prob=cfg.jitter_prob,
        brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue,
        grayscale_prob=cfg.grayscale_prob, blur_prob=cfg.blur_prob,
        blur_sigma=(cfg.blur_sigma[0], cfg.blur_sigma[1]), flip_prob=cfg.flip_prob,
    )
