"""Hungarian matching: the one per-image assignment loop, ``hungarian_match``, and the mask matcher
(K-Net's ``MaskHungarianAssigner``).

Every family's matcher supplies only its per-image cost matrix: ``HungarianMatcher`` (mask dice + mask
agreement + focal class, K-Net), ``Mask2FormerMatcher`` (point-sampled BCE + dice + softmax class,
``sp_ray.objectives.mask2former_criterion``) and ``BoxHungarianMatcher`` (L1 + GIoU + focal class, Sparse R-CNN /
QueryInst, ``sp_ray.objectives.queryinst_criterion``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

# Per image of a batch, (pred_idx, tgt_idx), int64 [M_b] each: prediction pred_idx[j] is matched to target
# tgt_idx[j]. The criteria return one such list per stage with ``return_matches=True``.
Matches = list[tuple[Tensor, Tensor]]


def hungarian_match(
    cost: Callable[[int], Tensor], num_targets: Sequence[int], *, device: torch.device
) -> Matches:
    """The optimal one-to-one assignment of each image's predictions to its targets (DETR eq. 1).

    sigma_b = argmin over injective pairings of sum_j cost(b)[pred_j, tgt_j], solved exactly by
    ``scipy.optimize.linear_sum_assignment`` on the CPU; every image gets min(N, K_b) pairs.

    Args:
        cost: b -> float [N, K_b], the weighted matching cost of image b (predictions x targets). It runs with
            autocast disabled, so costs are float32 even under AMP (bf16 sums over many pixels would blur
            close costs), and is not called for an image without targets.
        num_targets: K_b of each image b; its length is the batch size B.
        device: where the returned indices live (the predictions' device).

    Returns:
        B pairs (pred_idx, tgt_idx), int64 [min(N, K_b)] each on ``device``, sorted by pred_idx; empty for
        K_b = 0.

    Raises:
        ValueError: on a non-finite cost (NaN/inf predictions), naming the image.
    """
    indices: Matches = []
    for b, count in enumerate(num_targets):
        if count == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            indices.append((empty, empty.clone()))
            continue
        with torch.autocast(device_type=device.type, enabled=False):
            matrix = cost(b).cpu()
        if not torch.isfinite(matrix).all():
            raise ValueError(f"matcher: non-finite matching cost for image {b}; the predictions contain NaN/inf")
        rows, cols = linear_sum_assignment(matrix.numpy())
        # linear_sum_assignment returns rows in increasing order already.
        indices.append(
            (
                torch.as_tensor(rows, dtype=torch.int64, device=device),
                torch.as_tensor(cols, dtype=torch.int64, device=device),
            )
        )
    return indices


def focal_class_cost(logits: Tensor, labels: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal classification cost at the target label (mmdet ``FocalLossCost``).

    cost[n, k] = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)),
    p = sigmoid(logits[n, labels[k]]): the focal loss of calling kernel n positive for class labels[k]
    minus that of calling it negative.

    Args:
        logits: float [N, C] class logits.
        labels: int64 [K] target classes in 0..C-1.
        alpha: focal alpha.
        gamma: focal gamma.

    Returns:
        float [N, K], unweighted.
    """
    eps = 1e-12
    p = logits.float().sigmoid()
    pos = alpha * (1 - p).pow(gamma) * -(p + eps).log()
    neg = (1 - alpha) * p.pow(gamma) * -(1 - p + eps).log()
    return (pos - neg)[:, labels]


def dice_cost(mask_logits: Tensor, targets: Tensor, *, eps: float = 1e-3) -> Tensor:
    """Negative dice coefficient between every prediction and every target (mmdet ``DiceCost``).

    cost[n, k] = -2 sum_p(m_n t_k) / (sum_p m_n^2 + eps + sum_p t_k^2 + eps), m = sigmoid(mask_logits).

    Args:
        mask_logits: float [N, P] mask logits, P pixels.
        targets: float [K, P] target masks in [0, 1] (soft borders allowed).
        eps: smoothing of each denominator term.

    Returns:
        float [N, K], unweighted.
    """
    p = mask_logits.float().sigmoid()
    t = targets.float()
    inter = p @ t.T
    denom = (p * p).sum(1)[:, None] + (t * t).sum(1)[None, :] + 2 * eps
    return -2 * inter / denom


def mask_cost(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """Negative mean pixel agreement (mmdet ``MaskCost`` on sigmoid predictions).

    cost[n, k] = -[sum_p m_n t_k + sum_p (1 - m_n)(1 - t_k)] / P, m = sigmoid(mask_logits).

    Args:
        mask_logits: float [N, P] mask logits.
        targets: float [K, P] target masks in [0, 1].

    Returns:
        float [N, K], unweighted.
    """
    p = mask_logits.float().sigmoid()
    t = targets.float()
    agree = p @ t.T + (1 - p) @ (1 - t).T
    return -agree / p.shape[1]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of the N kernels of each image to its K targets (K-Net section 3.4).

    The cost approximates the training loss of each pairing: the focal term mirrors the class loss,
    the dice and mask terms mirror the dice and BCE mask losses, with the loss weights as cost weights.

    Args:
        cost_class: weight of ``focal_class_cost``.
        cost_dice: weight of ``dice_cost``.
        cost_mask: weight of ``mask_cost``.
        focal_alpha: alpha of the class cost.
        focal_gamma: gamma of the class cost.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_dice: float = 4.0,
        cost_mask: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.cost_class = cost_class
        self.cost_dice = cost_dice
        self.cost_mask = cost_mask
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(
        self, logits: Tensor | None, mask_logits: Tensor, labels: Tensor, masks: Tensor
    ) -> Tensor:
        """Weighted cost of one image.

        Args:
            logits: float [N, C] or None (no class cost, e.g. the initial masks).
            mask_logits: float [N, h, w].
            labels: int64 [K].
            masks: float [K, h, w].

        Returns:
            float [N, K].
        """
        pred = mask_logits.flatten(1)
        tgt = masks.flatten(1).to(pred.dtype)
        cost = self.cost_dice * dice_cost(pred, tgt) + self.cost_mask * mask_cost(pred, tgt)
        if logits is not None:
            cost = cost + self.cost_class * focal_class_cost(
                logits, labels, alpha=self.focal_alpha, gamma=self.focal_gamma
            )
        return cost

    @torch.no_grad()
    def forward(self, pred_logits: Tensor | None, pred_masks: Tensor, targets: list[dict[str, Tensor]]) -> Matches:
        """Match every image of the batch (``hungarian_match`` on ``cost_matrix``).

        Args:
            pred_logits: float [B, N, C] class logits, or None to match on masks only.
            pred_masks: float [B, N, h, w] mask logits.
            targets: B dicts with ``labels`` int64 [K] and ``masks`` float [K, h, w] (the h, w of
                pred_masks).

        Returns:
            B pairs (pred_idx, tgt_idx), int64 [min(N, K)] each on pred_masks' device, sorted by pred_idx.

        Raises:
            ValueError: on a batch-size or mask-size mismatch, or a non-finite cost (NaN predictions).
        """
        if len(targets) != pred_masks.shape[0]:
            raise ValueError(
                f"matcher: {len(targets)} targets for a batch of {pred_masks.shape[0]} predictions"
            )
        for b, target in enumerate(targets):
            if target["masks"].shape[-2:] != pred_masks.shape[-2:]:
                raise ValueError(
                    f"matcher: target masks {tuple(target['masks'].shape[-2:])} and predicted masks "
                    f"{tuple(pred_masks.shape[-2:])} of image {b} differ in size; resize the targets first"
                )

        def cost(b: int) -> Tensor:
            logits = None if pred_logits is None else pred_logits[b]
            return self.cost_matrix(logits, pred_masks[b], targets[b]["labels"], targets[b]["masks"])

        return hungarian_match(cost, [t["labels"].numel() for t in targets], device=pred_masks.device)
