"""From K-Net outputs to scored instances: exportable top-k selection, then per-image masks and boxes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

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


def paste_mask_logits(
    mask_logits: Tensor,
    *,
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    mask_stride: int = 8,
    mask_threshold: float = 0.5,
) -> tuple[Tensor, list[Tensor]]:
    """Threshold mask logits resampled to the original size, each mask computed only inside its box.

    With s = mask_stride, every original pixel maps to its position in the valid region [0, H) x [0, W)
    of the input and then to cell coordinates of the mask map, clamped to the ceil(H / s) x ceil(W / s)
    cells that hold valid pixels; the logit there is interpolated bilinearly (``grid_sample``, pixel
    centres as ``align_corners=False``). When H and W are multiples of s this equals ``F.interpolate``
    of the cropped logits. A bilinear value is a convex combination of its cells, so only pixels that
    read a cell above the threshold can be in the mask: each mask is sampled only over the pixels whose
    cells meet the box of its cells above the threshold (as torchvision / detectron2 paste a mask into
    its box), so the cost grows with the mask's area, not with K x H0 x W0. Inside the box the grid
    and the sampling are those of a full-image resampling, so the masks are identical to it.

    Args:
        mask_logits: float [K, h, w], covering the padded input (h * s, w * s).
        image_size: (H, W), the valid region of the input.
        orig_size: (H0, W0), the size of the image on disk.
        mask_stride: s, the stride of the mask logits relative to the input (8 for K-Net).
        mask_threshold: a pixel is in the mask where sigmoid(logit) > mask_threshold.

    Returns:
        (boxes int64 [K, 4] x0, y0, x1, y1 of each mask's tight extent in original pixels, x1 / y1
        exclusive, zeros for an empty mask; K bool crops, crop k [y1 - y0, x1 - x0]).
    """
    k, h, w = mask_logits.shape
    valid_h, valid_w = image_size
    out_h, out_w = orig_size
    if not (0 < valid_h <= h * mask_stride and 0 < valid_w <= w * mask_stride):
        raise ValueError(
            f"image_size {image_size} must lie inside the padded input {(h * mask_stride, w * mask_stride)}"
        )
    device = mask_logits.device

    def cell_positions(out_size: int, valid: int) -> Tensor:
        # Original pixel centres -> input pixels -> cell-centre coordinates of the mask map, clamped to
        # the cells that hold valid pixels.
        pixels = torch.arange(out_size, device=device, dtype=torch.float32)
        centres = (pixels + 0.5) * (valid / out_size)
        return (centres / mask_stride - 0.5).clamp(0, math.ceil(valid / mask_stride) - 1)

    cell_y, cell_x = cell_positions(out_h, valid_h), cell_positions(out_w, valid_w)
    grid_y, grid_x = (2 * cell_y + 1) / h - 1, (2 * cell_x + 1) / w - 1  # normalised for grid_sample
    # grid_sample reads cells floor(c) and floor(c) + 1 of its own unnormalised c, which may round to
    # the neighbouring integer: cells within one of floor(c) bound what each pixel reads.
    low_y, low_x = cell_y.floor().long(), cell_x.floor().long()
    logit_threshold = torch.logit(torch.tensor(mask_threshold, dtype=torch.float64)).item()
    boxes = torch.zeros((k, 4), dtype=torch.int64, device=device)
    crops: list[Tensor] = []
    for i, logits in enumerate(mask_logits.float()):
        # Threshold on logits: sigmoid(x) > p is x > logit(p); the kept pixels are re-checked as sigmoid.
        above = logits > logit_threshold
        rows, cols = above.any(dim=1).nonzero()[:, 0], above.any(dim=0).nonzero()[:, 0]
        if len(rows) == 0:
            crops.append(torch.zeros((0, 0), dtype=torch.bool, device=device))
            continue
        y0, y1 = (int(v) for v in torch.searchsorted(low_y, torch.stack([rows[0] - 1, rows[-1] + 2])))
        x0, x1 = (int(v) for v in torch.searchsorted(low_x, torch.stack([cols[0] - 1, cols[-1] + 2])))
        if y1 <= y0 or x1 <= x0:
            crops.append(torch.zeros((0, 0), dtype=torch.bool, device=device))
            continue
        grid = torch.stack(torch.meshgrid(grid_x[x0:x1], grid_y[y0:y1], indexing="xy"), dim=-1)[None]
        sampled = F.grid_sample(logits[None, None], grid, mode="bilinear", align_corners=False)[0, 0]
        boxes[i], crop = _tight(sampled.sigmoid() > mask_threshold, top=y0, left=x0)
        crops.append(crop)
    return boxes, crops


def _tight(crop: Tensor, *, top: int, left: int) -> tuple[Tensor, Tensor]:
    """(x0, y0, x1, y1) of the True pixels of ``crop`` placed at (top, left), and the crop cut to them;
    zeros and an empty crop when there is none."""
    rows, cols = crop.any(dim=1).nonzero()[:, 0], crop.any(dim=0).nonzero()[:, 0]
    if len(rows) == 0:
        return torch.zeros(4, dtype=torch.int64), crop.new_zeros((0, 0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return torch.tensor([left + c0, top + r0, left + c1, top + r1]), crop[r0:r1, c0:c1]


def paste_roi_masks(
    mask_probs: Tensor, boxes: Tensor, *, orig_size: tuple[int, int], mask_threshold: float = 0.5, padding: int = 1
) -> tuple[Tensor, list[Tensor]]:
    """torchvision's ``paste_masks_in_image`` thresholded, one box at a time instead of one image per mask.

    Each M x M mask gets ``padding`` cells of zeros, its box is enlarged by (M + 2 padding) / M
    (torchvision's ``expand_masks`` / ``expand_boxes``), the mask is resized bilinearly to the box and
    the part inside the image is kept where it exceeds the threshold: the same pixels as torchvision's,
    without its float32 image of H0 x W0 per detection.

    Args:
        mask_probs: float [K, M, M] probabilities.
        boxes: float [K, 4] xyxy in original pixels.
        orig_size: (H0, W0).
        mask_threshold: a pixel is in the mask where its pasted probability > mask_threshold.
        padding: cells added on each side.

    Returns:
        (boxes int64 [K, 4], crops) as ``paste_mask_logits``: each mask's tight extent and pixels.
    """
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    out_h, out_w = orig_size
    padded, scale = expand_masks(mask_probs[:, None].float(), padding)
    expanded = expand_boxes(boxes.float(), scale).to(torch.int64)
    tight = torch.zeros((len(mask_probs), 4), dtype=torch.int64, device=mask_probs.device)
    crops: list[Tensor] = []
    for i, (bx0, by0, bx1, by1) in enumerate(expanded.tolist()):
        x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, out_w), max(by0, 0), min(by1 + 1, out_h)
        if x1 <= x0 or y1 <= y0:
            crops.append(torch.zeros((0, 0), dtype=torch.bool, device=mask_probs.device))
            continue
        size = (max(by1 - by0 + 1, 1), max(bx1 - bx0 + 1, 1))
        resized = F.interpolate(padded[i : i + 1], size=size, mode="bilinear", align_corners=False)[0, 0]
        box, crop = _tight(resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] > mask_threshold, top=y0, left=x0)
        tight[i] = box
        crops.append(crop)
    return tight, crops


def paste_crops(boxes: Tensor, crops: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Dense masks from box crops: bool [K, H, W], crop k written at boxes[k] (x0, y0, x1, y1), False elsewhere."""
    masks = torch.zeros((len(crops), *size), dtype=torch.bool, device=boxes.device)
    for k, ((x0, y0, x1, y1), crop) in enumerate(zip(boxes.tolist(), crops, strict=True)):
        masks[k, y0:y1, x0:x1] = crop
    return masks


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
        ``masks`` bool [k', H0, W0] and ``boxes`` float [k', 4] xyxy in original pixels, the masks' extents
        (zeros for empty masks). Masks are resampled box by box (``paste_mask_logits``), so the memory
        beyond the returned masks (1 byte a pixel each) is that of one box.
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
        orig_size = tuple(orig_sizes[b])
        boxes, crops = paste_mask_logits(
            mask_logits[b][keep], image_size=tuple(image_sizes[b]), orig_size=orig_size,
            mask_stride=mask_stride, mask_threshold=mask_threshold,
        )
        results.append(
            {
                "scores": scores[b][keep],
                "labels": labels[b][keep],
                "masks": paste_crops(boxes, crops, orig_size),
                "boxes": boxes.float(),
            }
        )
    return results
