"""The loss terms of the set criteria: sigmoid focal classification, BCE and dice mask losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(
    logits: Tensor, targets_onehot: Tensor, *, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "sum"
) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017, eq. 5), summed; the caller normalises.

    FL = -alpha_t (1 - p_t)^gamma log(p_t), per class and prediction, p = sigmoid(logits).

    Args:
        logits: float [..., C] class logits.
        targets_onehot: float [..., C] in {0, 1}; all zeros for background.
        alpha: weight of the positives (1 - alpha for the negatives).
        gamma: focusing exponent.
        reduction: "sum", or "none" for the elementwise FL (a caller that weights the elements).

    Returns:
        float scalar, the sum over all elements; with "none", float [..., C].
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"sigmoid_focal_loss: reduction must be 'sum' or 'none', got {reduction!r}")
    logits = logits.float()
    t = targets_onehot.to(logits.dtype)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    loss = alpha_t * (1 - p_t).pow(gamma) * ce
    return loss.sum() if reduction == "sum" else loss


def dice_loss(mask_logits: Tensor, targets: Tensor, *, eps: float = 1e-3) -> Tensor:
    """Dice loss per mask (Milletari et al. 2016; mmdet ``DiceLoss`` as K-Net uses it).

    L = 1 - 2 sum_p(m t) / (sum_p m^2 + sum_p t^2 + 2 eps), m = sigmoid(mask_logits).

    Args:
        mask_logits: float [M, P] mask logits.
        targets: float [M, P] targets in [0, 1].
        eps: smoothing of each denominator term.

    Returns:
        float [M].
    """
    p = mask_logits.float().sigmoid()
    t = targets.to(p.dtype)
    inter = (p * t).sum(1)
    denom = (p * p).sum(1) + (t * t).sum(1) + 2 * eps
    return 1 - 2 * inter / denom


def mask_bce_loss(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of mask logits, mean over all pixels of all masks.

    Args:
        mask_logits: float [M, P] mask logits.
        targets: float [M, P] targets in [0, 1] (soft borders allowed).

    Returns:
        float scalar; 0 (still attached to the graph) when M = 0.
    """
    if mask_logits.numel() == 0:
        return mask_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(mask_logits.float(), targets.to(torch.float32))


