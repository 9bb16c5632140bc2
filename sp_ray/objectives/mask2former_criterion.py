"""Mask2Former's matching and losses: point-sampled mask costs and losses, softmax classification.

Mask2Former (Cheng et al. 2022, section 3.3 and 4.1) computes mask costs and losses on K sampled points
instead of whole masks: matching uses K points drawn uniformly (the same for every prediction and target of
an image); the loss of a matched pair uses importance sampling (PointRend, Kirillov et al. 2020): draw
``oversample_ratio`` x K uniform points, keep the ``importance_sample_ratio`` x K where the prediction is most
uncertain (logit closest to 0), fill up with uniform points. Targets are sampled from the full-resolution
masks, predictions from the stride-4 logits, both bilinearly. K = 12544 (112 x 112) in the paper.

Classification is a softmax over C + 1 classes with the "no object" class weighted by ``no_object_weight``
(0.1), on ``pred_class_logits`` (see ``sp_ray.models.mask2former``). Losses are normalised by the number of
target masks in the batch, averaged over the workers (DETR's ``num_boxes``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sp_ray.models.mask2former import MASK_STRIDE, Mask2FormerOutputs
from sp_ray.objectives.losses import mask_bce_loss
from sp_ray.objectives.matcher import Matches, hungarian_match
from sp_ray.objectives.set_criterion import SetCriterion
from sp_ray.types import Target


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of maps at continuous points (detectron2 ``point_sample``, ``align_corners=False``).

    Border padding, where detectron2 pads with zeros: in the outer half cell a zero pad would pull the stride-4
    logits towards 0, the most "uncertain" value, and draw the importance sampling to the image border.

    Args:
        inputs: float [M, C, h, w].
        coords: float [M, P, 2], (x, y) in [0, 1] relative to the map (0 and 1 are its outer edges).

    Returns:
        float [M, C, P].
    """
    grid = (2 * coords - 1)[:, :, None, :]  # (M, P, 1, 2)
    return F.grid_sample(
        inputs, grid.to(inputs.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )[..., 0]


@torch.no_grad()
def sample_uncertain_points(
    mask_logits: Tensor, *, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """Importance-sampled points of each mask (PointRend training sampling, as Mask2Former uses it).

    Draws ``int(num_points * oversample_ratio)`` uniform points, keeps the ``int(importance_sample_ratio *
    num_points)`` with the highest uncertainty -|logit|, and adds uniform points up to ``num_points``.

    Args:
        mask_logits: float [M, 1, h, w].
        num_points: P.
        oversample_ratio: >= 1.
        importance_sample_ratio: in [0, 1].

    Returns:
        float [M, P, 2], (x, y) in [0, 1].
    """
    count = mask_logits.shape[0]
    device = mask_logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    candidates = torch.rand(count, num_sampled, 2, device=device)
    uncertainty = -point_sample(mask_logits, candidates)[:, 0].abs()  # (M, P * ratio)
    top = uncertainty.topk(num_uncertain, dim=1).indices
    uncertain = torch.gather(candidates, 1, top[:, :, None].expand(-1, -1, 2))
    uniform = torch.rand(count, num_points - num_uncertain, 2, device=device)
    return torch.cat([uncertain, uniform], dim=1)


def naive_dice_loss(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss per mask as Mask2Former defines it: 1 - (2 sum(m t) + 1) / (sum m + sum t + 1).

    Not ``sp_ray.objectives.losses.dice_loss``: K-Net's (mmdet's V-Net form) squares the terms of the
    denominator and smooths with 2e-3; Mask2Former's sums them and smooths numerator and denominator by 1.

    Args:
        mask_logits: float [M, P] logits at the sampled points.
        targets: float [M, P] in [0, 1].

    Returns:
        float [M].
    """
    p = mask_logits.float().sigmoid()
    t = targets.float()
    return 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)


def naive_dice_cost(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """``naive_dice_loss`` of every prediction against every target.

    Args:
        mask_logits: float [N, P].
        targets: float [K, P].

    Returns:
        float [N, K].
    """
    p = mask_logits.float().sigmoid()
    t = targets.float()
    return 1 - (2 * p @ t.T + 1) / (p.sum(1)[:, None] + t.sum(1)[None, :] + 1)


def pairwise_bce_cost(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy over the points of every prediction against every target.

    cost[n, k] = (1 / P) sum_p [t_kp softplus(-x_np) + (1 - t_kp) softplus(x_np)], the BCE with logits x.

    Args:
        mask_logits: float [N, P].
        targets: float [K, P] in [0, 1].

    Returns:
        float [N, K].
    """
    x = mask_logits.float()
    t = targets.float()
    return (F.softplus(-x) @ t.T + F.softplus(x) @ (1 - t).T) / x.shape[1]


def softmax_class_cost(class_logits: Tensor, labels: Tensor) -> Tensor:
    """Negative softmax probability of the target class (DETR / Mask2Former class cost).

    Args:
        class_logits: float [N, C + 1].
        labels: int64 [K] in 0..C-1.

    Returns:
        float [N, K].
    """
    return -class_logits.float().softmax(-1)[:, labels]


class Mask2FormerMatcher(nn.Module):
    """Hungarian matching of Mask2Former: costs on ``num_points`` uniform points per image.

    cost = cost_class * (-p_class) + cost_mask * BCE + cost_dice * dice, the BCE and dice on the points (the
    loss terms, so the cost approximates the loss of each pairing). ``hungarian_match`` does the per-image
    assignment in float32.

    Args:
        cost_class: weight of ``softmax_class_cost`` (2).
        cost_mask: weight of ``pairwise_bce_cost`` (5).
        cost_dice: weight of ``naive_dice_cost`` (5).
        num_points: uniform points per image (12544).
    """

    def __init__(
        self, *, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544
    ) -> None:
        super().__init__()
        if num_points < 1:
            raise ValueError(f"Mask2FormerMatcher: num_points must be >= 1, got {num_points}")
        self.cost_class = cost_class
        self.cost_dice = cost_dice
        self.cost_mask = cost_mask
        self.num_points = num_points

    def cost_matrix(self, logits: Tensor | None, mask_logits: Tensor, labels: Tensor, masks: Tensor) -> Tensor:
        """Weighted cost of one image.

        Args:
            logits: float [N, C + 1] softmax class logits, or None (no class cost).
            mask_logits: float [N, 1, P] logits at the image's points.
            labels: int64 [K].
            masks: float [K, 1, P] targets at the same points.

        Returns:
            float [N, K].
        """
        pred = mask_logits.flatten(1)
        tgt = masks.flatten(1).to(pred.dtype)
        cost = self.cost_mask * pairwise_bce_cost(pred, tgt) + self.cost_dice * naive_dice_cost(pred, tgt)
        if logits is not None:
            cost = cost + self.cost_class * softmax_class_cost(logits, labels)
        return cost

    @torch.no_grad()
    def forward(self, pred_logits: Tensor | None, pred_masks: Tensor, targets: list[dict[str, Tensor]]) -> Matches:
        """Match every image of the batch on freshly drawn uniform points.

        Draws one ``torch.rand(B, num_points, 2)`` of point coordinates (the same points for the predictions
        and targets of an image), then ``hungarian_match`` on ``cost_matrix``.

        Args:
            pred_logits: float [B, N, C + 1] softmax class logits, or None to match on masks only.
            pred_masks: float [B, N, h, w] mask logits.
            targets: B dicts with ``labels`` int64 [K] and ``masks`` [K, H, W] (bool or float, any resolution
                covering the same padded input as ``pred_masks``).

        Returns:
            B pairs (pred_idx, tgt_idx), int64 [min(N, K)] each, sorted by pred_idx.

        Raises:
            ValueError: on a batch-size mismatch or a non-finite cost (NaN predictions).
        """
        if len(targets) != pred_masks.shape[0]:
            raise ValueError(f"matcher: {len(targets)} targets for a batch of {pred_masks.shape[0]} predictions")
        batch = pred_masks.shape[0]
        coords = torch.rand(batch, self.num_points, 2, device=pred_masks.device)
        pred_points = point_sample(pred_masks.float(), coords)[:, :, None]  # (B, N, 1, P)
        point_targets = []
        for b, target in enumerate(targets):
            masks = target["masks"]
            if masks.shape[0] == 0:
                sampled = pred_points.new_zeros(0, 1, self.num_points)
            else:
                sampled = point_sample(masks[None].to(pred_points.dtype), coords[b : b + 1])[0][:, None]  # (K, 1, P)
            point_targets.append(sampled)

        def cost(b: int) -> Tensor:
            logits = None if pred_logits is None else pred_logits[b]
            return self.cost_matrix(logits, pred_points[b], targets[b]["labels"], point_targets[b])

        return hungarian_match(cost, [t["labels"].numel() for t in targets], device=pred_masks.device)


class Mask2FormerCriterion(SetCriterion):
    """Mask2Former set criterion: per-layer Hungarian matching, softmax CE, point-sampled BCE and dice.

    Every prediction (the one from the queries before layer 1 and one per decoder layer) is matched on its
    own detached outputs and supervised with the same weights (the paper's deep supervision):
    L_i = cls_weight L_ce + mask_weight L_bce + dice_weight L_dice (Mask2Former section 4.1), the mask terms
    on points, summed over the matched masks and divided by the number of target masks of the batch averaged
    over the workers (``SetCriterion``'s normaliser), the class term a weighted mean over every query.
    Matching and losses draw their random points stage by stage: stage 0's matching, stage 0's losses,
    stage 1's matching, ...

    ``criterion(outputs, targets, *, return_matches=False)`` (``SetCriterion.forward``) takes the model's
    ``Mask2FormerOutputs`` (mask logits at stride 4, ``pred_class_logits`` and ``init_class_logits``
    [B, N, C + 1]) and B ``Target`` dicts (``labels`` int64 [K], ``masks`` bool [K, H, W] at the padded input
    size) and returns ``loss_cls_s{i}``, ``loss_mask_s{i}``, ``loss_dice_s{i}`` for i = 0 (before layer 1)
    .. L, float scalars already multiplied by their weights; with ``return_matches``, also the matches: a list
    over [init, layer 1, .., layer L] of B pairs (pred_idx, tgt_idx) int64.

    Args:
        num_classes: C.
        matcher: the point-sampling matcher.
        cls_weight: weight of ``loss_cls_s{i}`` (2).
        mask_weight: weight of ``loss_mask_s{i}`` (5).
        dice_weight: weight of ``loss_dice_s{i}`` (5).
        no_object_weight: class weight of "no object" in the cross-entropy (0.1).
        num_points: points per matched mask (12544).
        oversample_ratio: candidate points per kept point of the importance sampling (3).
        importance_sample_ratio: share of the points taken where the prediction is most uncertain (0.75).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: Mask2FormerMatcher,
        cls_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"Mask2FormerCriterion: num_classes must be >= 1, got {num_classes}")
        if num_points < 1:
            raise ValueError(f"Mask2FormerCriterion: num_points must be >= 1, got {num_points}")
        if oversample_ratio < 1:
            raise ValueError(f"Mask2FormerCriterion: oversample_ratio must be >= 1, got {oversample_ratio}")
        if not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError(
                f"Mask2FormerCriterion: importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.cls_weight = cls_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = no_object_weight
        self.register_buffer("class_weight", class_weight, persistent=False)

    def _prepare_targets(
        self, targets: list[Target], input_size: tuple[int, int], device: torch.device
    ) -> list[dict[str, Tensor]]:
        prepared = []
        for b, target in enumerate(targets):
            labels, masks = target["labels"], target["masks"]
            if tuple(masks.shape[-2:]) != input_size or masks.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"target {b}: masks {tuple(masks.shape)} must be [K, H, W] with K = {labels.shape[0]} "
                    f"labels and (H, W) = {input_size}, the padded input size"
                )
            labels = labels.to(device=device, dtype=torch.int64)
            if labels.numel() and ((labels < 0) | (labels >= self.num_classes)).any():
                raise ValueError(f"target labels must be in 0..{self.num_classes - 1} (contiguous class indices)")
            prepared.append({"labels": labels, "masks": masks.to(device=device, dtype=torch.float32)})
        return prepared

    def _class_loss(self, class_logits: Tensor, targets: list[dict[str, Tensor]], matches: Matches) -> Tensor:
        target_classes = torch.full(class_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=class_logits.device)  # (B, N), "no object" by default
        for b, (pred_idx, tgt_idx) in enumerate(matches):
            target_classes[b, pred_idx] = targets[b]["labels"][tgt_idx]
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, weight=self.class_weight)

    def _mask_losses(
        self, mask_logits: Tensor, targets: list[dict[str, Tensor]], matches: Matches, num_masks: Tensor
    ) -> tuple[Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(matches)])
        pred_idx = torch.cat([p for p, _ in matches])
        if pred_idx.numel() == 0:
            zero = mask_logits.sum() * 0
            return zero, zero
        pred = mask_logits[batch_idx, pred_idx][:, None]  # (M, 1, h, w)
        tgt = torch.cat([t["masks"][ti] for t, (_, ti) in zip(targets, matches, strict=True)])[:, None]  # (M, 1, H, W)
        coords = sample_uncertain_points(
            pred.detach(), num_points=self.num_points, oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_sample_ratio,
        )
        pred_points = point_sample(pred.float(), coords)[:, 0]  # (M, P)
        with torch.no_grad():
            tgt_points = point_sample(tgt, coords)[:, 0]  # (M, P)
        count = pred_points.shape[0]
        # mask_bce_loss is the mean over M x P; the paper sums per-mask means and divides by num_masks.
        loss_mask = mask_bce_loss(pred_points, tgt_points) * count / num_masks
        loss_dice = naive_dice_loss(pred_points, tgt_points).sum() / num_masks
        return loss_mask, loss_dice

    def _prepare(
        self, outputs: Mask2FormerOutputs, targets: list[Target]
    ) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]], torch.device]:
        """Stages [init (queries before layer 1), layers 1..L-1, layer L] and the float targets."""
        init_masks = outputs["init_masks"]
        batch = init_masks.shape[0]
        if len(targets) != batch:
            raise ValueError(f"Mask2FormerCriterion: {len(targets)} targets for a batch of {batch} images")
        input_size = (init_masks.shape[-2] * MASK_STRIDE, init_masks.shape[-1] * MASK_STRIDE)
        tgts = self._prepare_targets(targets, input_size, init_masks.device)
        stages = [
            {"pred_class_logits": outputs["init_class_logits"], "pred_masks": init_masks},
            *outputs["aux_outputs"],
            outputs,
        ]
        return stages, tgts, init_masks.device

    def _match(
        self,
        stage_index: int,
        stage: dict[str, Tensor],
        previous: dict[str, Tensor] | None,
        previous_matches: Matches | None,
        targets: list[dict[str, Tensor]],
    ) -> Matches:
        """Each stage on its own detached class logits and masks."""
        return self.matcher(stage["pred_class_logits"].detach(), stage["pred_masks"].detach(), targets)

    def _positive_count(self, targets: list[dict[str, Tensor]], matches: Matches) -> int:
        """The number of target masks of the batch (DETR's ``num_boxes``), not of matched pairs."""
        return sum(int(t["labels"].numel()) for t in targets)

    def _stage_losses(
        self,
        stage_index: int,
        stage: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        matches: Matches,
        num_pos: Tensor,
    ) -> dict[str, Tensor]:
        class_logits, masks = stage["pred_class_logits"], stage["pred_masks"]
        loss_mask, loss_dice = self._mask_losses(masks, targets, matches, num_pos)
        return {
            "cls": self._class_loss(class_logits, targets, matches) * self.cls_weight,
            "mask": loss_mask * self.mask_weight,
            "dice": loss_dice * self.dice_weight,
        }
