"""How well masks or features fit ground-truth instances, without training a segmenter.

Two measures of a backbone's usefulness for saliency prompting (METHODS.md 1.1): the recall of the
ground-truth instances by class-agnostic mask proposals (the pseudo masks that pre-training learns
from), and a linear probe of per-pixel foreground / background on frozen features (how linearly
"objectness" can be read from them). Both are plain functions over tensors, on any device.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from torch import Tensor


def mask_iou_matrix(pred_masks: Tensor, gt_masks: Tensor) -> Tensor:
    """Mask IoU of every prediction with every ground-truth instance.

    Args:
        pred_masks: bool [L, H, W].
        gt_masks: bool [K, H, W], same H, W.

    Returns:
        float [L, K], |P_l & G_k| / |P_l | G_k|; 0 where both masks are empty.

    Raises:
        ValueError: the inputs are not [*, H, W] masks of the same size.
    """
    if pred_masks.dim() != 3 or gt_masks.dim() != 3 or pred_masks.shape[1:] != gt_masks.shape[1:]:
        raise ValueError(
            f"masks must be [L, H, W] and [K, H, W] of one image size, got {tuple(pred_masks.shape)} "
            f"and {tuple(gt_masks.shape)}; resize the proposals to the annotation size first"
        )
    pred = pred_masks.flatten(1).float()  # (L, H*W)
    gt = gt_masks.flatten(1).float().to(pred.device)  # (K, H*W)
    inter = pred @ gt.T  # (L, K)
    union = pred.sum(1)[:, None] + gt.sum(1)[None, :] - inter
    return inter / union.clamp_min(1.0)


def best_iou_per_instance(pred_masks: Tensor, gt_masks: Tensor) -> Tensor:
    """For each ground-truth instance, the IoU of the proposal that covers it best.

    Several instances may be covered by the same proposal (recall, not a one-to-one matching), as
    for the average recall of class-agnostic proposals.

    Args:
        pred_masks: bool [L, H, W], the proposals of one image (L may be 0).
        gt_masks: bool [K, H, W], its instances (K may be 0).

    Returns:
        float [K], max over l of IoU(P_l, G_k); 0 for every instance when there is no proposal.
    """
    ious = mask_iou_matrix(pred_masks, gt_masks)  # (L, K)
    if ious.shape[0] == 0:
        return torch.zeros(ious.shape[1], device=ious.device)
    return ious.amax(0)


@dataclass
class RecallSummary:
    """Recall of ground-truth instances by proposals, over a set of images.

    Attributes:
        instances: number of ground-truth instances counted.
        recall: {IoU threshold: fraction of instances whose best IoU is >= the threshold}.
        mean_best_iou: mean over instances of the best IoU (0 for an instance no proposal touches).
    """

    instances: int
    recall: dict[float, float]
    mean_best_iou: float


def proposal_recall(
    best_ious: Tensor | Sequence[Tensor], *, thresholds: Sequence[float] = (0.5,)
) -> RecallSummary:
    """Recall at IoU thresholds from the best IoU of every instance.

    Args:
        best_ious: float [K] over all images, or one [K_i] tensor per image (outputs of
            `best_iou_per_instance`).
        thresholds: IoU thresholds in (0, 1]; an instance counts at t when its best IoU is >= t.

    Returns:
        A `RecallSummary`; with no instance at all, recall and mean IoU are NaN.

    Raises:
        ValueError: a threshold outside (0, 1].
    """
    bad = [t for t in thresholds if not 0 < t <= 1]
    if bad:
        raise ValueError(f"IoU thresholds must be in (0, 1], got {bad}")
    if not isinstance(best_ious, Tensor):
        best_ious = torch.cat([b.flatten().float().cpu() for b in best_ious]) if best_ious else torch.zeros(0)
    values = best_ious.flatten().float()
    count = values.numel()
    if count == 0:
        return RecallSummary(instances=0, recall={float(t): float("nan") for t in thresholds},
                             mean_best_iou=float("nan"))
    recall = {float(t): (values >= t).float().mean().item() for t in thresholds}
    return RecallSummary(instances=count, recall=recall, mean_best_iou=values.mean().item())


def pseudo_mask_recall(
    pseudo_annotations: str | Path, gt_annotations: str | Path, *, thresholds: Sequence[float] = (0.5,)
) -> RecallSummary:
    """Recall of the ground-truth instances of a COCO json by the pseudo masks of ``sp-ray propose``.

    Images are paired by ``file_name``; every non-crowd instance of every ground-truth image counts,
    so an image the proposer skipped or left without masks lowers the recall.

    Args:
        pseudo_annotations: the proposer's ``annotations.json`` (any category).
        gt_annotations: a COCO instance json of (some of) the same images.
        thresholds: IoU thresholds in (0, 1].

    Returns:
        A `RecallSummary` over the ground-truth instances.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        pseudo, gt = COCO(str(pseudo_annotations)), COCO(str(gt_annotations))
    pseudo_ids = {image["file_name"]: image_id for image_id, image in pseudo.imgs.items()}
    best: list[Tensor] = []
    for image_id, image in gt.imgs.items():
        gt_anns = [a for a in gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if not gt_anns:
            continue
        gt_masks = torch.from_numpy(np.stack([gt.annToMask(a) for a in gt_anns]).astype(bool))
        pseudo_id = pseudo_ids.get(image["file_name"])
        anns = pseudo.imgToAnns.get(pseudo_id, []) if pseudo_id is not None else []
        masks = [pseudo.annToMask(a) for a in anns]
        pred = torch.from_numpy(np.stack(masks).astype(bool)) if masks else torch.zeros(0, *gt_masks.shape[1:])
        best.append(best_iou_per_instance(pred.bool(), gt_masks))
    return proposal_recall(best, thresholds=thresholds)


def sample_pixel_features(
    features: Tensor, labels: Tensor, *, per_image: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Features at random label pixels, as if the feature map were bilinearly upsampled to the labels.

    Sampling ``per_image`` pixels instead of upsampling whole maps keeps the probe's training set
    small (a 512-channel C5 upsampled to 160 x 160 is 13 M floats per image). The value at pixel
    (y, x) equals ``F.interpolate(features, size=(H, W), mode="bilinear")[:, :, y, x]``.

    Args:
        features: float [B, D, h, w].
        labels: bool [B, H, W], the per-pixel targets at label resolution.
        per_image: pixels drawn uniformly (with replacement) from each image.
        generator: random source of the pixel positions (on the CPU).

    Returns:
        (x, y): float [B * per_image, D] features and bool [B * per_image] labels.

    Raises:
        ValueError: batch sizes differ, shapes are not [B, D, h, w] / [B, H, W], or per_image < 1.
    """
    if features.dim() != 4 or labels.dim() != 3 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features must be [B, D, h, w] and labels [B, H, W] with one B, got {tuple(features.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    batch, height, width = labels.shape
    ys = torch.randint(height, (batch, per_image), generator=generator)
    xs = torch.randint(width, (batch, per_image), generator=generator)
    # Pixel centres in grid_sample's [-1, 1] frame (align_corners False): the same source positions
    # as F.interpolate's bilinear resize, with border clamping like its edge handling.
    grid = torch.stack([(xs + 0.5) / width * 2 - 1, (ys + 0.5) / height * 2 - 1], dim=-1)  # (B, P, 2)
    grid = grid[:, None].to(features.device, features.dtype)  # (B, 1, P, 2)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = sampled[:, :, 0].permute(0, 2, 1).reshape(-1, features.shape[1])  # (B*P, D)
    index = torch.arange(batch)[:, None]
    y = labels.cpu()[index, ys, xs].reshape(-1).to(features.device)  # (B*P,)
    return x, y


@dataclass
class LinearProbe:
    """A per-pixel logistic regression, i.e. a 1x1 convolution with one output, on standardised features.

    ``logit = sum_d weight_d * (f_d - mean_d) / std_d + bias``.

    Attributes:
        weight: float [D].
        bias: float [].
        mean: float [D], feature means of the training pixels.
        std: float [D], feature standard deviations of the training pixels (at least 1e-6).
    """

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor

    def logits(self, features: Tensor) -> Tensor:
        """Foreground logits of a feature map.

        Args:
            features: float [B, D, h, w].

        Returns:
            float [B, h, w].
        """
        scale = (self.weight / self.std).to(features)  # (D,)
        offset = (self.bias - (self.weight * self.mean / self.std).sum()).to(features)
        return torch.einsum("bdhw,d->bhw", features, scale) + offset


def fit_linear_probe(
    x: Tensor, y: Tensor, *, steps: int = 100, weight_decay: float = 1e-4
) -> LinearProbe:
    """Fit a logistic regression of the labels on the features with full-batch L-BFGS.

    Minimises mean binary cross-entropy + weight_decay / 2 * ||w||^2 over standardised features
    (bias not decayed). L-BFGS on the whole (small) training set converges in a few dozen
    iterations, so the result depends on the features, not on an optimiser schedule.

    Args:
        x: float [N, D] pixel features.
        y: bool [N] foreground labels.
        steps: maximum L-BFGS iterations.
        weight_decay: L2 strength on the weights.

    Returns:
        The fitted `LinearProbe`, tensors on x's device.

    Raises:
        ValueError: shapes disagree, features are not finite, or the labels hold only one class.
    """
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"x must be [N, D] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("probe features hold NaN or inf; check the backbone and its input")
    positives = int(y.sum())
    if positives in (0, y.numel()):
        raise ValueError(
            f"the probe needs foreground and background pixels, got {positives} foreground of {y.numel()}; "
            "sample more pixels or more images"
        )
    x = x.float()
    target = y.to(x.device, torch.float32)
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    z = (x - mean) / std  # (N, D)
    weight = torch.zeros(x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros((), device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ weight + bias, target)
        loss = loss + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(weight=weight.detach(), bias=bias.detach(), mean=mean, std=std)


def probe_predict(probe: LinearProbe, features: Tensor, size: tuple[int, int]) -> Tensor:
    """Foreground masks of the probe on feature maps upsampled bilinearly to ``size``.

    The probe is affine and bilinear weights sum to one, so upsampling the [B, h, w] logits equals
    applying the probe to upsampled features, at a fraction of the memory.

    Args:
        probe: a fitted `LinearProbe`.
        features: float [B, D, h, w].
        size: (H, W) of the output.

    Returns:
        bool [B, H, W], logit > 0.
    """
    logits = probe.logits(features)[:, None]  # (B, 1, h, w)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[:, 0] > 0


@dataclass
class ForegroundScores:
    """Per-pixel foreground / background agreement, summed over a set of images.

    Attributes:
        pixels: number of pixels scored.
        accuracy: fraction of pixels whose prediction equals the label.
        foreground_iou: |pred & label| / |pred | label| over all foreground pixels (NaN if both are empty).
        foreground_fraction: share of foreground pixels in the labels (the accuracy of predicting
            background everywhere is 1 minus this).
    """

    pixels: int
    accuracy: float
    foreground_iou: float
    foreground_fraction: float


def foreground_scores(pred: Tensor | Sequence[Tensor], labels: Tensor | Sequence[Tensor]) -> ForegroundScores:
    """Pixel accuracy and foreground IoU of predicted foreground masks.

    Args:
        pred: bool [B, H, W], or one bool [H_i, W_i] (or [B_i, H_i, W_i]) tensor per image.
        labels: the same shapes, the true foreground.

    Returns:
        A `ForegroundScores` pooled over all pixels (a dataset-level IoU, not a mean of per-image IoUs).

    Raises:
        ValueError: a prediction and its labels differ in shape, or there is no pixel.
    """
    preds = [pred] if isinstance(pred, Tensor) else list(pred)
    truths = [labels] if isinstance(labels, Tensor) else list(labels)
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions but {len(truths)} label maps")
    pixels = correct = inter = union = foreground = 0
    for p, t in zip(preds, truths, strict=True):
        if p.shape != t.shape:
            raise ValueError(f"prediction {tuple(p.shape)} and labels {tuple(t.shape)} differ in shape")
        p, t = p.bool(), t.bool().to(p.device)
        pixels += p.numel()
        correct += int((p == t).sum())
        inter += int((p & t).sum())
        union += int((p | t).sum())
        foreground += int(t.sum())
    if pixels == 0:
        raise ValueError("no pixels to score")
    return ForegroundScores(
        pixels=pixels,
        accuracy=correct / pixels,
        foreground_iou=inter / union if union else float("nan"),
        foreground_fraction=foreground / pixels,
    )
