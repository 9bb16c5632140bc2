"""Saliency mask proposals from frozen C5 features: SP's masks proposal, i.e. FreeSOLO's Free Mask.

Every position of the C5 map, at several pyramid scales, is a 1x1 query kernel S_ij; its correlation
with the features, Y_ij = Conv(S_ij, X) in the SP paper (Li et al., CVPR 2023), taken as cosine
similarity and min-max normalised per query, is a soft mask. FreeSOLO (Wang et al., CVPR 2022, "Free
Mask") ranks these masks by maskness, suppresses duplicates with Matrix NMS (SOLOv2, Wang et al.,
NeurIPS 2020) and filters them. METHODS.md 1.1 lists the steps this module numbers below.

``SaliencyProposer`` is the ``sp_ray.pretrain.proposers.Proposer`` of ``sp-ray propose`` built on them: a frozen
ResNet (`build_frozen_backbone`) whose C5 of every resized image (`input_size`, `prepare_image`) gives its masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sp_ray.config import Config, ProposeConfig
from sp_ray.data.transforms import resize_for_inference
from sp_ray.models.backbone import build_resnet
from sp_ray.models.common import IMAGENET_MEAN, IMAGENET_STD, SIZE_DIVISOR
from sp_ray.pretrain.proposers import OBJECT_CATEGORY, Proposals, Ready, c5_channels

# Soft masks upsampled to the image at once are capped at this many floats (256 MiB), so that a
# 20-mask batch of a multi-megapixel photo does not allocate gigabytes.
_UPSAMPLE_BUDGET = 1 << 26


def matrix_nms(masks: Tensor, scores: Tensor, *, sigma: float = 2.0) -> Tensor:
    """Gaussian Matrix NMS of SOLOv2 with a single label (METHODS.md 1.1 step 8).

    With IoU_ij the IoU of masks i < j (i ranked higher) and comp_i = max_k IoU_ki the overlap of
    mask i with anything above it, mask j's score is multiplied by
    decay_j = min_i exp(-sigma * IoU_ij^2) / exp(-sigma * comp_i^2): it decays by its overlap with
    higher-ranked masks, less so where those masks were themselves suppressed.

    Args:
        masks: bool [M, h, w] (any trailing shape), ranked best first.
        scores: float [M], sorted in descending order.
        sigma: Gaussian decay strength.

    Returns:
        float [M], the decayed scores in the input order (not re-sorted).

    Raises:
        ValueError: masks and scores disagree in length, or scores are not sorted descending.
    """
    if masks.shape[0] != scores.shape[0]:
        raise ValueError(f"matrix_nms: {masks.shape[0]} masks but {scores.shape[0]} scores")
    if scores.numel() > 1 and not bool((scores[:-1] >= scores[1:]).all()):
        raise ValueError("matrix_nms: scores must be sorted in descending order (masks ranked best first)")
    if scores.numel() == 0:
        return scores.clone()
    flat = masks.flatten(1).float()  # (M, h*w)
    inter = flat @ flat.T  # (M, M)
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    iou = (inter / union.clamp_min(1.0)).triu(1)  # iou[i, j] for i ranked above j
    compensation = iou.amax(0)  # (M,) overlap of each mask with the masks ranked above it
    decay = torch.exp(-sigma * (iou.square() - compensation[:, None].square())).amin(0)
    return scores * decay


def pyramid_queries(c5: Tensor, scales: Sequence[float]) -> Tensor:
    """The query vectors S: the C5 features resized by each scale, flattened (step 3).

    Args:
        c5: float [C, h, w].
        scales: resize factors, each > 0; a side is floor(side * scale), at least 1.

    Returns:
        float [N_q, C] with N_q = sum over scales of the resized h * w, scales in the given order.
    """
    channels, h, w = c5.shape
    levels = []
    for scale in scales:
        if scale <= 0:
            raise ValueError(f"pyramid scales must be > 0, got {list(scales)}")
        size = (max(1, int(h * scale)), max(1, int(w * scale)))
        level = c5 if size == (h, w) else F.interpolate(c5[None], size=size, mode="bilinear")[0]
        levels.append(level.reshape(channels, -1).T)  # (h_s * w_s, C)
    return torch.cat(levels)


def mask_boxes_from_projections(masks: Tensor) -> Tensor:
    """Boxes from the x and y projections of masks, as FreeSOLO's Free Mask draws them (step 10).

    On each axis the extent is the number of rows (columns) the mask touches and the centre is the
    centre of mass of that projection, pixel k spanning [k, k + 1); the box is centre +- extent / 2.
    For a mask whose projections have no gaps this is its tight box.

    Args:
        masks: bool [L, H, W].

    Returns:
        float [L, 4] xyxy in pixels; an empty mask gives a zero-size box at 0.
    """
    boxes = []
    for dim in (1, 2):  # dim 1 collapses rows -> x projection; dim 2 collapses columns -> y projection
        projection = masks.any(dim=dim).float()  # (L, W) or (L, H)
        coords = torch.arange(projection.shape[1], device=masks.device, dtype=torch.float32) + 0.5
        extent = projection.sum(1)
        centre = (projection * coords).sum(1) / extent.clamp_min(1.0)
        boxes.append((centre - extent / 2, centre + extent / 2))
    (x0, x1), (y0, y1) = boxes
    return torch.stack([x0, y0, x1, y1], dim=1)


def saliency_proposals(
    c5: Tensor,
    image_size: tuple[int, int],
    *,
    scales: Sequence[float] = (1.0, 0.5, 0.25),
    mask_threshold: float = 0.5,
    min_area: int = 2,
    sigma: float = 2.0,
    top_k: int = 20,
    min_center_y: float = 0.2,
    max_box_width: float = 0.95,
    min_maskness: float = 0.7,
) -> Proposals:
    """Free-Mask saliency proposals of one image from its C5 features (METHODS.md 1.1 steps 3-11).

    Each pyramid query S_ij gives the soft mask Y_ij = Conv(S_ij, X) (SP paper), here the cosine
    similarity of the L2-normalised query with every L2-normalised C5 feature, min-max normalised
    per query (FreeSOLO's Free Mask). Masks are Y >= mask_threshold with at least min_area C5 cells;
    maskness is the mean of Y inside the mask; Matrix NMS decays it; the top_k survivors are
    upsampled to the image as soft maps and only then binarised (the SP release binarises at C5
    size, a bug not copied); finally a mask is kept if its box centre lies below min_center_y * H,
    its box is narrower than max_box_width * W and its decayed maskness is >= min_maskness.

    Args:
        c5: float [C, h, w], the frozen backbone's C5 features of the image; the C5 grid must cover
            the image exactly (input sides a multiple of the stride, no padding).
        image_size: (H, W) of the output masks, normally the original image size.
        scales: resize factors of the query pyramid.
        mask_threshold: binarisation threshold of the normalised correlation, at C5 and image size.
        min_area: minimum mask area in C5 cells before NMS.
        sigma: Gaussian Matrix NMS strength.
        top_k: masks kept after NMS, before the filters.
        min_center_y: minimum box centre y as a fraction of H (strictly greater).
        max_box_width: maximum box width as a fraction of W (strictly smaller).
        min_maskness: minimum decayed maskness.

    Returns:
        ``Proposals`` with L <= top_k masks, ranked by decayed maskness; tensors on c5's device.

    Raises:
        ValueError: c5 is not [C, h, w], holds non-finite values, or image_size is not positive.
    """
    if c5.dim() != 3:
        raise ValueError(f"c5 must be [C, h, w] features of one image, got shape {tuple(c5.shape)}")
    height, width = (int(side) for side in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive (H, W), got {image_size}")
    if not bool(torch.isfinite(c5).all()):
        raise ValueError("c5 features hold NaN or inf; check the backbone weights and the input image")
    c5 = c5.float()
    channels, h, w = c5.shape

    # Steps 3-5: cosine correlation of every query with every key, min-max normalised per query.
    queries = F.normalize(pyramid_queries(c5, scales), dim=1)  # (N_q, C)
    keys = F.normalize(c5.reshape(channels, h * w), dim=0)  # (C, h*w)
    soft = queries @ keys  # (N_q, h*w)
    low = soft.amin(1, keepdim=True)
    soft = (soft - low) / (soft.amax(1, keepdim=True) - low).clamp_min(1e-12)

    # Steps 6-7: binarise, drop tiny masks, maskness.
    binary = soft >= mask_threshold
    area = binary.sum(1)
    keep = area >= min_area
    soft, binary, area, queries = soft[keep], binary[keep], area[keep], queries[keep]
    maskness = (soft * binary).sum(1) / area.clamp_min(1)

    # Steps 8-10: Matrix NMS, top k, masks at the image size and their boxes.
    masks, scores, boxes, queries = nms_top_k_masks(
        soft, binary, maskness, queries, grid=(h, w), image_size=(height, width), sigma=sigma, top_k=top_k,
        mask_threshold=mask_threshold,
    )

    # Step 11: the filters.
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    box_width = boxes[:, 2] - boxes[:, 0]
    keep = (
        masks.flatten(1).any(1)
        & (centre_y > min_center_y * height)
        & (box_width < max_box_width * width)
        & (scores >= min_maskness)
    )
    return Proposals(masks=masks[keep], scores=scores[keep], boxes=boxes[keep], queries=queries[keep])


def nms_top_k_masks(
    soft: Tensor,
    binary: Tensor,
    maskness: Tensor,
    queries: Tensor,
    *,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    sigma: float,
    top_k: int,
    mask_threshold: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """METHODS.md 1.1 steps 7-10 for candidate masks of any proposer: rank by maskness, decay it by Matrix NMS,
    keep the top k by decayed maskness, upsample their soft maps to the image, binarise, take the boxes.

    Args:
        soft: float [M, h*w] soft maps at feature resolution.
        binary: bool [M, h*w] candidate masks.
        maskness: float [M].
        queries: [M, D] the vector of each candidate, carried along.
        grid: (h, w) of the feature grid.
        image_size: (H, W) of the output masks.
        sigma: Gaussian Matrix NMS strength.
        top_k: masks kept after NMS.
        mask_threshold: binarisation threshold of the upsampled soft maps.

    Returns:
        masks bool [L, H, W], scores (decayed maskness) [L], boxes [L, 4] xyxy, queries [L, D]; L <= top_k,
        best first.
    """
    order = maskness.argsort(descending=True, stable=True)
    soft, binary, maskness, queries = soft[order], binary[order], maskness[order], queries[order]
    decayed = matrix_nms(binary, maskness, sigma=sigma)
    order = decayed.argsort(descending=True, stable=True)[:top_k]
    soft, scores, queries = soft[order].reshape(-1, *grid), decayed[order], queries[order]
    masks = upsample_binarise(soft, image_size, mask_threshold)
    return masks, scores, mask_boxes_from_projections(masks), queries


def upsample_binarise(soft: Tensor, size: tuple[int, int], threshold: float) -> Tensor:
    """Soft masks float [L, h, w] -> bool [L, H, W]: bilinear upsampling to the image size, then the threshold.

    Binarising after upsampling keeps the masks' sub-cell shape (METHODS.md 1.1: the reference code
    thresholds at feature resolution). Upsampled in chunks so that COCO-size images fit in memory.
    """
    masks = torch.zeros((soft.shape[0], *size), dtype=torch.bool, device=soft.device)
    chunk = max(1, _UPSAMPLE_BUDGET // (size[0] * size[1]))
    for start in range(0, soft.shape[0], chunk):
        upsampled = F.interpolate(soft[None, start : start + chunk], size=size, mode="bilinear")[0]
        masks[start : start + chunk] = upsampled >= threshold
    return masks


# ---------------------------------------------------------------- the saliency proposer of `sp-ray propose`


def input_size(height: int, width: int, cfg: ProposeConfig) -> tuple[int, int]:
    """(H, W) of the backbone input for an image of height x width.

    keep_ratio false: (short_size, max_size), SP's fixed 1333x800 resize. keep_ratio true: the keep-ratio
    resize of `resize_for_inference`. Each side is then rounded to the nearest multiple of 32 (at least
    32) so that the C5 grid covers the input exactly.
    """
    if cfg.keep_ratio:
        height, width = resize_for_inference(height, width, max_size=cfg.max_size, short_size=cfg.short_size)
    else:
        height, width = cfg.short_size, cfg.max_size
    return (
        max(SIZE_DIVISOR, round(height / SIZE_DIVISOR) * SIZE_DIVISOR),
        max(SIZE_DIVISOR, round(width / SIZE_DIVISOR) * SIZE_DIVISOR),
    )


def prepare_image(pixels: np.ndarray, size: tuple[int, int], device: torch.device) -> Tensor:
    """Resize (bilinear, antialiased) and normalise with the ImageNet mean/std of 0..255 input, as K-Net.

    Args:
        pixels: uint8 [H0, W0, 3] RGB.
        size: (H, W) of the backbone input.
        device: where the result lives.

    Returns:
        float [3, H, W].
    """
    image = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(2, 0, 1).float()  # (3, H0, W0)
    image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0].clamp(0, 255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    return (image - mean) / std


def build_frozen_backbone(cfg: Config) -> nn.Module:
    """The proposal backbone: ResNet ``model.depth`` with ``model.backbone_weights``, all stages frozen.

    A random init (no weights file; meant for tests) is drawn from ``train.seed``, so every actor and
    every rerun holds the same network and a recomputed shard equals the first computation.
    """
    if cfg.model.backbone_weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            return build_resnet(cfg.model.depth, weights=None, frozen_stages=4, norm_eval=True).eval()
    backbone = build_resnet(
        cfg.model.depth, weights=cfg.model.backbone_weights, frozen_stages=4, norm_eval=True
    )
    return backbone.eval()


def saliency_identity(cfg: Config) -> dict[str, Any]:
    """What saliency proposals depend on besides the images, for ``propose``'s shard fingerprints: the
    ``propose`` settings that change results (not batching, sharding or the proposer's name) and the backbone
    (depth, weights file with its size and mtime, the seed of a random init)."""
    propose = dataclasses.asdict(cfg.propose)
    for unrelated in ("batch_size", "shard_size", "num_actors", "cpus_per_actor"):
        propose.pop(unrelated)
    propose.pop("proposer")  # saliency shards keep the fingerprints they had before CLIP existed
    weights = cfg.model.backbone_weights
    stamp = None
    if weights is not None and Path(weights).is_file():
        stat = Path(weights).stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
    seed = cfg.train.seed if weights is None else None  # the random init depends on it
    return {
        "propose": propose,
        "depth": cfg.model.depth,
        "weights": weights,
        "weights_stamp": stamp,
        "seed": seed,
    }


class SaliencyProposer:
    """Saliency proposals of a frozen backbone as ``propose``'s proposal source (a ``Proposer``).

    A batch is resized by `input_size` and forwarded in groups of equal input size (one group when
    ``propose.keep_ratio`` is false); `saliency_proposals` then reads each image's masks off its C5.

    Args:
        backbone: a module whose forward returns a list whose last element is C5 [B, C, h, w] and which
            exposes ``out_channels`` (`build_frozen_backbone`).
        cfg: the ``propose`` section.
        device: where the backbone lives.
    """

    def __init__(self, backbone: nn.Module, cfg: ProposeConfig, *, device: torch.device) -> None:
        self.backbone = backbone
        self.cfg = cfg
        self.device = device

    @classmethod
    def from_config(cls, cfg: Config, *, device: torch.device) -> SaliencyProposer:
        """The proposer of ``cfg``: `build_frozen_backbone` on ``device``, settings ``propose.*``."""
        return cls(build_frozen_backbone(cfg).to(device), cfg.propose, device=device)

    @property
    def prompt_width(self) -> int:
        return c5_channels(self.backbone)

    @property
    def categories(self) -> list[dict[str, Any]]:
        return [OBJECT_CATEGORY]  # class-free pseudo masks

    def check_size(self, height: int, width: int) -> None:
        input_size(height, width, self.cfg)

    def __call__(self, ready: Ready) -> list[Proposals]:
        cfg, device = self.cfg, self.device
        groups: dict[tuple[int, int], list[int]] = {}
        for position, (_, pixels) in enumerate(ready):
            groups.setdefault(input_size(pixels.shape[0], pixels.shape[1], cfg), []).append(position)
        results: list[Proposals | None] = [None] * len(ready)
        for size, positions in groups.items():
            batch = torch.stack([prepare_image(ready[p][1], size, device) for p in positions])  # (B, 3, H, W)
            with torch.inference_mode():
                c5 = self.backbone(batch)[-1]  # (B, C, H/32, W/32)
                for row, position in enumerate(positions):
                    pixels = ready[position][1]
                    results[position] = saliency_proposals(
                        c5[row],
                        (pixels.shape[0], pixels.shape[1]),
                        scales=cfg.scales,
                        mask_threshold=cfg.mask_threshold,
                        min_area=cfg.min_area,
                        sigma=cfg.nms_sigma,
                        top_k=cfg.top_k,
                        min_center_y=cfg.min_center_y,
                        max_box_width=cfg.max_box_width,
                        min_maskness=cfg.min_maskness,
                    )
        return [result for result in results if result is not None]
