"""From K-Net outputs to scored instances: exportable top-k selection, then per-image masks and boxes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sp_ray.data.transforms import mask_boxes
from sp_ray.types import ModelOutputs


def select_topk(pred_logits: Tensor, pred_masks: Tensor, *, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pick the k best (kernel, class) pairs of each image, scored by class probability x maskness.

    Exportable: fixed k, no ``.item()``, no data-dependent shapes. The N x C sigmoid scores are flattened
    and the top k taken (K-Net test); each is re-scored by the maskness of its mask, the mean
    sigmoid over the pixels where sigmoid > 0.5 (0 for an empty mask), and the k are re-sorted.

    Args:
        pred_logits: float [B, N, C] class logits.
        pred_masks: float [B, N, h, w] mask logits.
        k: number of detections per image, 1 <= k <= N * C.

    Returns:
        (scores float [B, k] descending, labels int64 [B, k] in 0..C-1, mask_logits float [B, k, h, w]).
    """
    _, n, c = pred_logits.shape
    if not 1 <= k <= n * c:
        raise ValueError(f"select_topk: k must be in 1..N*C = {n * c}, got {k}")
    h, w = pred_masks.shape[-2:]
    cls_scores, flat_idx = pred_logits.sigmoid().flatten(1).topk(k, dim=1)  # (B, k)
    kernel_idx = torch.div(flat_idx, c, rounding_mode="floor")
    labels = flat_idx - kernel_idx * c
    masks = torch.gather(pred_masks, 1, kernel_idx[:, :, None, None].expand(-1, -1, h, w))  # (B, k, h, w)
    soft = masks.sigmoid().flatten(2)
    inside = (soft > 0.5).to(soft.dtype)
    maskness = (soft * inside).sum(-1) / inside.sum(-1).clamp(min=1.0)
    scores, order = (cls_scores * maskness).topk(k, dim=1)
    labels = torch.gather(labels, 1, order)
    masks = torch.gather(masks, 1, order[:, :, None, None].expand(-1, -1, h, w))
    return scores, labels, masks


def resize_mask_logits(
    mask_logits: Tensor, *, image_size: tuple[int, int], orig_size: tuple[int, int], mask_stride: int = 8
) -> Tensor:
    """Crop mask logits to the valid (unpadded) input region and resample them to the original size.

    With s = mask_stride, the crop keeps the ceil(H / s) x ceil(W / s) cells that hold valid pixels; one
    bilinear resampling (``grid_sample``, pixel-centre convention of ``align_corners=False``, sample
    positions clamped to the crop) then maps every original pixel to its position in the valid region
    [0, H) x [0, W). When H and W are multiples of s this equals ``F.interpolate`` of the cropped logits;
    otherwise it also places the partial last cell correctly, without materialising the padded input size.

    Args:
        mask_logits: float [K, h, w], covering the padded input (h * s, w * s).
        image_size: (H, W), the valid region of the input.
        orig_size: (H0, W0), the size of the image on disk.
        mask_stride: s, the stride of the mask logits relative to the input (8 for K-Net).

    Returns:
        float [K, H0, W0] logits.
    """
    k, h, w = mask_logits.shape
    valid_h, valid_w = image_size
    out_h, out_w = orig_size
    if not (0 < valid_h <= h * mask_stride and 0 < valid_w <= w * mask_stride):
        raise ValueError(
            f"image_size {image_size} must lie inside the padded input {(h * mask_stride, w * mask_stride)}"
        )
    if k == 0:
        return mask_logits.new_zeros((0, out_h, out_w))

    def sample_positions(out_size: int, valid: int, cells: int) -> Tensor:
        # Original pixel centres -> input pixels -> cell-centre coordinates of the mask map, clamped to
        # the cropped cells, -> normalised grid coordinates of the whole map.
        pixels = torch.arange(out_size, device=mask_logits.device, dtype=torch.float32)
        centres = (pixels + 0.5) * (valid / out_size)
        cell = (centres / mask_stride - 0.5).clamp(0, math.ceil(valid / mask_stride) - 1)
        return (2 * cell + 1) / cells - 1

    gy = sample_positions(out_h, valid_h, h)
    gx = sample_positions(out_w, valid_w, w)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]  # (1, H0, W0, 2)
    resized = F.grid_sample(mask_logits[None].float(), grid, mode="bilinear", align_corners=False)
    return resized[0]


def postprocess(
    outputs: ModelOutputs,
    *,
    image_sizes: list[tuple[int, int]],
    orig_sizes: list[tuple[int, int]],
    k: int = 100,
    mask_threshold: float = 0.5,
    score_threshold: float = 0.0,
    mask_stride: int = 8,
) -> list[dict[str, Tensor]]:
    """Turn the last stage's predictions into instances in original image pixels.

    Args:
        outputs: ``ModelOutputs`` of a batch of B images.
        image_sizes: B (H, W), the valid (resized, unpadded) region of each input.
        orig_sizes: B (H0, W0), the size of each image on disk.
        k: detections per image before thresholding; capped at N * C.
        mask_threshold: a pixel is in the mask where sigmoid(logit) > mask_threshold.
        score_threshold: keep detections with score > score_threshold.
        mask_stride: stride of ``pred_masks`` relative to the padded input (8 for K-Net).

    Returns:
        B dicts with ``scores`` float [k'] descending, ``labels`` int64 [k'] (contiguous 0..C-1),
        ``masks`` bool [k', H0, W0] and ``boxes`` float [k', 4] xyxy in original pixels (zeros for empty
        masks).
    """
    # float32 whatever the autocast dtype of the forward pass, so scores and thresholds are exact.
    pred_logits, pred_masks = outputs["pred_logits"].float(), outputs["pred_masks"].float()
    batch, n, c = pred_logits.shape
    if len(image_sizes) != batch or len(orig_sizes) != batch:
        raise ValueError(
            f"postprocess: {len(image_sizes)} image_sizes and {len(orig_sizes)} orig_sizes "
            f"for a batch of {batch}"
        )
    scores, labels, mask_logits = select_topk(pred_logits, pred_masks, k=min(k, n * c))
    results = []
    for b in range(batch):
        keep = scores[b] > score_threshold
        logits = resize_mask_logits(
            mask_logits[b][keep],
            image_size=tuple(image_sizes[b]),
            orig_size=tuple(orig_sizes[b]),
            mask_stride=mask_stride,
        )
        masks = logits.sigmoid() > mask_threshold
        results.append(
            {
                "scores": scores[b][keep],
                "labels": labels[b][keep],
                "masks": masks,
                "boxes": mask_boxes(masks),
            }
        )
    return results
