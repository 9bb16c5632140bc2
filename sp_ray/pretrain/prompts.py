"""Saliency prompts of SP pre-training (METHODS.md 1.2): how they are made and how kernels take them.

A prompt P_l is a D-dimensional vector for pseudo mask l of an image. Two sources:

- feature prompt (``feature_prompts``): the FPN level P5 average-pooled inside the mask's box;
- image prompt (``ImagePromptEncoder``): the box crop of the image, augmented, through the backbone,
  average-pooled C5, then a trainable Linear to the kernel width.

Both are cut from the gradient at their source, as the reference does (``extract_patches`` returns
detached backbone features; only the image prompt's Linear learns, through the kernels it is added to).
``match_prompts_to_kernels`` turns an image's prompts into one offset per kernel, added to the initial
kernels K^0 before the kernel-update stages. Prompts exist only in pre-training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.transforms import v2

PROMPT_RULES = ("cosine", "fixed")


def tile_indices(count: int, length: int, *, device: torch.device | None = None) -> Tensor:
    """Indices that tile ``count`` items to ``length`` slots the way the reference tiles prompts.

    ``repeat_interleave(arange(count), length // count)`` followed by ``arange(length % count)``: each
    item is repeated in a block, the remainder is filled from the first items. With ``count > length``
    this keeps the first ``length`` items.

    Args:
        count: number of items, >= 1.
        length: number of slots, >= 0.
        device: device of the result.

    Returns:
        int64 [length], values in 0..count-1.
    """
    if count < 1:
        raise ValueError(f"tile_indices needs at least one item, got count={count}")
    items = torch.arange(count, device=device)
    return torch.cat([items.repeat_interleave(length // count), items[: length % count]])


def match_prompts_to_kernels(
    init_kernels: Tensor,
    prompts: list[Tensor],
    *,
    rule: str = "cosine",
    drop_prob: float = 0.1,
    num_prompts: int = 20,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Prompt-kernel matching and injection offsets, K_n = K_n^0 + m_n P_{delta(n)} (SP, METHODS.md 1.2).

    "cosine" (``upknet_cosine.py``, the paper's description): E[n, l] = cos(K_n^0, P_l) and every kernel
    takes its nearest prompt, delta(n) = argmax_l E[n, l]; several kernels may share one prompt.
    "fixed" (``upknet_feature.py``, UP-DETR style): the image's prompts are tiled to ``num_prompts``
    and those to the N kernels (``tile_indices`` twice; kernel n gets prompt n // 5 for 20 prompts and
    100 kernels). m_n ~ Bernoulli(1 - drop_prob) drops a kernel's prompt. Each image is matched on its
    own prompts; an image without prompts gets zero offsets. At most ``num_prompts`` prompts of an image
    are used (the first ones: pseudo masks come best first).

    Args:
        init_kernels: K^0, float [B, N, D]; only its values are used (no gradient flows into it).
        prompts: B tensors float [L_b, D] (L_b may be 0), already cut from the gradient at their source;
            gradients flow into the prompts through the offsets (the image prompt's Linear learns so).
        rule: "cosine" or "fixed".
        drop_prob: probability that a kernel gets no prompt, in [0, 1).
        num_prompts: the tiling length of the fixed rule and the cap on prompts per image, >= 1.
        generator: random generator of the drop mask (default: the global one of the kernels' device).

    Returns:
        float [B, N, D] offsets to add to K^0 (``KNet.forward(kernel_offsets=...)``).
    """
    if rule not in PROMPT_RULES:
        raise ValueError(f"prompt rule must be one of {PROMPT_RULES}, got {rule!r}")
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"prompt drop probability must be in [0, 1), got {drop_prob}")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    batch, num_kernels, channels = init_kernels.shape
    if len(prompts) != batch:
        raise ValueError(
            f"match_prompts_to_kernels: {len(prompts)} prompt sets for a batch of {batch} images"
        )
    device = init_kernels.device
    rows = []
    for b, image_prompts in enumerate(prompts):
        if image_prompts.dim() != 2 or image_prompts.shape[1] != channels:
            raise ValueError(
                f"prompts of image {b} must be [L, D] with D = {channels} (the kernel width), "
                f"got {tuple(image_prompts.shape)}"
            )
        image_prompts = image_prompts[:num_prompts].to(device=device, dtype=init_kernels.dtype)
        if image_prompts.shape[0] == 0:
            rows.append(init_kernels.new_zeros(num_kernels, channels))
            continue
        if rule == "cosine":
            similarity = (
                F.normalize(init_kernels[b].detach(), dim=1) @ F.normalize(image_prompts.detach(), dim=1).T
            )
            pick = similarity.argmax(dim=1)  # (N,)
        else:
            tiled = tile_indices(image_prompts.shape[0], num_prompts, device=device)
            pick = tiled[tile_indices(num_prompts, num_kernels, device=device)]  # (N,)
        rows.append(image_prompts[pick])
    offsets = torch.stack(rows)  # (B, N, D)
    draw_device = generator.device if generator is not None else device
    keep = torch.rand(batch, num_kernels, 1, generator=generator, device=draw_device) >= drop_prob
    return offsets * keep.to(device=device, dtype=offsets.dtype)


def box_cells(boxes: Tensor, *, stride: int, height: int, width: int) -> Tensor:
    """The cells of a stride-``stride`` map covered by boxes: x1, y1 floored, x2, y2 ceiled.

    A box whose cell range is empty (zero width or height on a cell boundary, or outside the map) is
    widened to at least one cell (the reference adds 2 cells to degenerate boxes; one suffices here
    because the ceiling already covers partly covered cells).

    Args:
        boxes: float [L, 4] XYXY in input pixels.
        stride: input pixels per cell.
        height: h of the map.
        width: w of the map.

    Returns:
        int64 [L, 4] cell ranges (x1, y1, x2, y2), end exclusive, with 0 <= x1 < x2 <= w, 0 <= y1 < y2 <= h.
    """
    cells = torch.cat([torch.floor(boxes[:, :2] / stride), torch.ceil(boxes[:, 2:] / stride)], dim=1).long()
    x1 = cells[:, 0].clamp(0, width - 1)
    y1 = cells[:, 1].clamp(0, height - 1)
    x2 = torch.maximum(cells[:, 2].clamp(max=width), x1 + 1)
    y2 = torch.maximum(cells[:, 3].clamp(max=height), y1 + 1)
    return torch.stack([x1, y1, x2, y2], dim=1)


def feature_prompts(p5: Tensor, boxes: list[Tensor], *, stride: int = 32) -> list[Tensor]:
    """Feature prompts: P5 average-pooled inside each pseudo mask's box (``upknet_feature.py``).

    Args:
        p5: FPN P5, float [B, D, h, w] at ``stride``.
        boxes: B tensors float [L_b, 4], XYXY in input pixels (the targets' ``boxes``).
        stride: input pixels per P5 cell.

    Returns:
        B tensors float [L_b, D], detached (prompts carry no gradient into the FPN).
    """
    if len(boxes) != p5.shape[0]:
        raise ValueError(f"feature_prompts: {len(boxes)} box sets for a batch of {p5.shape[0]} images")
    height, width = p5.shape[-2:]
    ys = torch.arange(height, device=p5.device)
    xs = torch.arange(width, device=p5.device)
    out = []
    for feats, image_boxes in zip(p5.detach(), boxes, strict=True):
        if image_boxes.shape[0] == 0:
            out.append(feats.new_zeros(0, feats.shape[0]))
            continue
        cells = box_cells(image_boxes.to(p5.device).float(), stride=stride, height=height, width=width)
        inside_y = (ys[None] >= cells[:, 1:2]) & (ys[None] < cells[:, 3:4])  # (L, h)
        inside_x = (xs[None] >= cells[:, 0:1]) & (xs[None] < cells[:, 2:3])  # (L, w)
        weights = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1).to(feats.dtype)  # (L, h*w)
        weights = weights / weights.sum(dim=1, keepdim=True)
        out.append(weights @ feats.flatten(1).T)  # (L, D)
    return out


class ImagePromptEncoder(nn.Module):
    """Image prompts: box crop -> augmentation -> backbone -> pooled C5 -> Linear (``upknet.py``).

    The crop is resized to ``crop_size`` squared (RoIAlign, all boxes of the batch at once), then per
    crop: ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale with p 0.2, Gaussian blur sigma in
    [0.1, 2] with p 0.5 (no flip: the reference notes it makes the pretext task too hard); augmentation
    only in training mode. The backbone runs without gradient; ``proj`` (the reference's
    ``patch2query``) is the only trained part.

    Args:
        in_channels: C5 channels of the backbone.
        out_channels: D, the kernel width.
        crop_size: side of the square crops in pixels.
    """

    def __init__(self, *, in_channels: int, out_channels: int, crop_size: int = 128) -> None:
        super().__init__()
        if crop_size < 32:
            raise ValueError(f"image prompt crop size must be >= 32 pixels (one C5 cell), got {crop_size}")
        self.crop_size = crop_size
        self.proj = nn.Linear(in_channels, out_channels)
        blur_kernel = 2 * (crop_size // 20) + 1  # about 10% of the crop, odd (MoCo-v2 uses 23 at 224)
        self.augment = v2.Compose(
            [
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
            ]
        )

    def forward(
        self, images: Tensor, boxes: list[Tensor], backbone: Callable[[Tensor], Tensor]
    ) -> list[Tensor]:
        """Encode the box crops of a batch.

        Args:
            images: float [B, 3, H, W], RGB 0..255.
            boxes: B tensors float [L_b, 4], XYXY in input pixels.
            backbone: maps RGB 0..255 crops float [M, 3, s, s] to C5 float [M, C, s/32, s/32]
                (normalisation is the caller's, so that it matches the detector's).

        Returns:
            B tensors float [L_b, D].
        """
        if len(boxes) != images.shape[0]:
            raise ValueError(f"image prompts: {len(boxes)} box sets for a batch of {images.shape[0]} images")
        counts = [int(b.shape[0]) for b in boxes]
        if sum(counts) == 0:
            # Touch the Linear so that every parameter takes part in the graph (DDP needs it).
            empty = self.proj.weight.sum() * 0
            return [images.new_zeros(0, self.proj.out_features) + empty for _ in boxes]
        with torch.no_grad():
            crops = roi_align(
                images.float(),
                [b.to(images.device).float() for b in boxes],
                output_size=self.crop_size,
                spatial_scale=1.0,
                sampling_ratio=2,
                aligned=True,
            )  # (M, 3, s, s)
            if self.training:
                crops = torch.stack([self.augment(crop / 255.0) for crop in crops]) * 255.0
            pooled = backbone(crops).mean(dim=(2, 3))  # (M, C)
        tokens = self.proj(pooled)  # (M, D)
        return list(tokens.split(counts))
