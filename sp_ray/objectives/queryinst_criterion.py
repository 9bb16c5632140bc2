"""QueryInst training: box-based Hungarian matching and the set criterion of every stage.

Sparse R-CNN / QueryInst (mmdet ``HungarianAssigner`` with FocalLossCost 2, BBoxL1Cost 5, IoUCost giou 2;
``DIIHead`` losses focal 2, L1 5, GIoU 2; ``DynamicMaskHead`` dice 8). Each stage is matched on its own
(detached) predictions and supervised in parallel; the mask of a matched query is compared with the target
mask cut out of the ground truth at the query's predicted box (mmdet ``mask_target``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou, generalized_box_iou_loss, roi_align

from sp_ray.models.queryinst import MASK_STRIDE
from sp_ray.objectives.losses import dice_loss, mask_bce_loss, sigmoid_focal_loss
from sp_ray.objectives.matcher import Matches, focal_class_cost, hungarian_match
from sp_ray.objectives.set_criterion import SetCriterion
from sp_ray.types import ModelOutputs, Target

# QueryInst's dice smoothing (mmdet ``DiceLoss(eps=1e-5)`` of ``DynamicMaskHead``).
DICE_EPS = 1e-5


class BoxHungarianMatcher(nn.Module):
    """One-to-one assignment of the N queries of each image to its K targets by class and box costs.

    cost[n, k] = w_cls * focal(logits_n, label_k) + w_l1 * |b_n - g_k|_1 / (W, H, W, H) - w_giou * GIoU(b_n, g_k),
    the costs mirroring the focal, L1 (on boxes normalised by the image size) and GIoU losses with the loss
    weights as cost weights (Sparse R-CNN).

    Args:
        cost_class: weight of ``focal_class_cost``.
        cost_l1: weight of the L1 distance of normalised xyxy boxes.
        cost_giou: weight of the negative generalised IoU.
        focal_alpha: alpha of the class cost.
        focal_gamma: gamma of the class cost.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_l1: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.cost_class = cost_class
        self.cost_l1 = cost_l1
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(
        self, logits: Tensor | None, boxes: Tensor, labels: Tensor, gt_boxes: Tensor, scale: Tensor
    ) -> Tensor:
        """Weighted cost of one image.

        Args:
            logits: float [N, C] or None (no class cost).
            boxes: float [N, 4] xyxy predicted boxes.
            labels: int64 [K].
            gt_boxes: float [K, 4] xyxy target boxes.
            scale: float [4], (W, H, W, H) of the image, the L1 normaliser.

        Returns:
            float [N, K].
        """
        boxes, gt_boxes = boxes.float(), gt_boxes.float()
        cost = self.cost_l1 * torch.cdist(boxes / scale, gt_boxes / scale, p=1)
        cost = cost - self.cost_giou * generalized_box_iou(boxes, gt_boxes)
        if logits is not None:
            cost = cost + self.cost_class * focal_class_cost(
                logits, labels, alpha=self.focal_alpha, gamma=self.focal_gamma
            )
        return cost

    @torch.no_grad()
    def forward(self, pred_logits: Tensor | None, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> Matches:
        """Match every image of the batch (``hungarian_match`` on ``cost_matrix``).

        Args:
            pred_logits: float [B, N, C] class logits, or None to match on boxes only.
            pred_boxes: float [B, N, 4] xyxy in input pixels.
            targets: B dicts with ``labels`` int64 [K], ``boxes`` float [K, 4] xyxy input pixels and
                ``scale`` float [4] = (W, H, W, H) of the valid image region.

        Returns:
            B pairs (pred_idx, tgt_idx), int64 [min(N, K)] each on pred_boxes' device, sorted by pred_idx.

        Raises:
            ValueError: on a batch-size mismatch or a non-finite cost (NaN predictions).
        """
        if len(targets) != pred_boxes.shape[0]:
            raise ValueError(f"matcher: {len(targets)} targets for a batch of {pred_boxes.shape[0]} predictions")

        def cost(b: int) -> Tensor:
            logits = None if pred_logits is None else pred_logits[b]
            target = targets[b]
            return self.cost_matrix(logits, pred_boxes[b], target["labels"], target["boxes"], target["scale"])

        return hungarian_match(cost, [t["labels"].numel() for t in targets], device=pred_boxes.device)


def roi_mask_targets(masks: Tensor, boxes: Tensor, target_idx: Tensor, *, size: int) -> Tensor:
    """Cut binary RoI mask targets out of an image's target masks (mmdet ``mask_target``).

    RoIAlign (pixel-centre aligned, adaptive sampling) of target mask ``target_idx[j]`` inside box j,
    binarised at 0.5.

    Args:
        masks: bool [K, H, W] target masks at the input size.
        boxes: float [M, 4] xyxy input pixels, the predicted boxes the masks are cut at.
        target_idx: int64 [M], the target of each box.
        size: side of the targets (28).

    Returns:
        float [M, size, size] in {0, 1}.
    """
    if target_idx.numel() == 0:
        return boxes.new_zeros((0, size, size))
    rois = torch.cat([target_idx.to(boxes.dtype)[:, None], boxes.float()], dim=1)
    cut = roi_align(masks[:, None].float(), rois, size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (cut[:, 0] >= 0.5).float()


class QueryInstCriterion(SetCriterion):
    """QueryInst set criterion: per-stage Hungarian matching; focal class, L1 + GIoU box and dice + BCE mask losses.

    Stage i is matched on its own detached class logits and boxes (Sparse R-CNN). The class loss covers
    every query (unmatched ones are background) and, like the box and dice losses, is divided by the number
    of matched queries averaged over the workers; BCE is a mean over the pixels of the matched RoI masks.

    Stage i's loss (QueryInst, Fang et al. 2021: Sparse R-CNN's set prediction loss plus the mask terms):
    L_i = cls_weight L_focal + l1_weight L_L1 + giou_weight L_giou + mask_weight L_bce + dice_weight L_dice.

    QueryInst has no stage-0 loss: the learned proposal boxes and features are trained through stage 1
    (``first_stage`` = 1). ``return_matches`` still gives a stage-0 entry, with no pairs, so the matches line
    up with [init, stage 1, .., stage S] as for K-Net. Every stage is matched before any loss
    (``match_ahead``), so that one RoIAlign per image cuts the mask targets of all stages.

    ``criterion(outputs, targets, *, return_matches=False)`` (``SetCriterion.forward``) takes the model's
    ``ModelOutputs`` with ``pred_boxes`` [B, N, 4] and ``pred_roi_masks`` [B, N, m, m] at every stage and B
    ``Target`` dicts (``labels`` int64 [K], ``boxes`` float [K, 4] xyxy input pixels, ``masks`` bool
    [K, H, W] at the padded input size, ``image_size`` the valid (H, W)) and returns, for i = 1..S,
    ``loss_cls_s{i}``, ``loss_l1_s{i}``, ``loss_giou_s{i}``, ``loss_mask_s{i}``, ``loss_dice_s{i}``, float
    scalars already weighted; with ``return_matches``, also the matches over [init (no pairs), stage 1, ..,
    stage S].

    Args:
        num_classes: C.
        matcher: the box Hungarian matcher.
        cls_weight: weight of ``loss_cls_s{i}`` (focal).
        l1_weight: weight of ``loss_l1_s{i}`` (L1 of normalised boxes).
        giou_weight: weight of ``loss_giou_s{i}``.
        mask_weight: weight of ``loss_mask_s{i}`` (BCE of the RoI masks).
        dice_weight: weight of ``loss_dice_s{i}`` (dice of the RoI masks; QueryInst's mask loss, 8).
    """

    first_stage = 1
    match_ahead = True

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: BoxHungarianMatcher,
        cls_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        mask_weight: float = 1.0,
        dice_weight: float = 8.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"QueryInstCriterion: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.cls_weight = cls_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight

    def _prepare_targets(
        self, targets: list[Target], input_size: tuple[int, int], device: torch.device
    ) -> list[dict[str, Tensor]]:
        prepared = []
        for b, target in enumerate(targets):
            labels, masks, boxes = target["labels"], target["masks"], target["boxes"]
            k = labels.shape[0]
            if tuple(masks.shape[-2:]) != input_size or masks.shape[0] != k or tuple(boxes.shape) != (k, 4):
                raise ValueError(
                    f"target {b}: masks {tuple(masks.shape)} and boxes {tuple(boxes.shape)} must be [K, H, W] "
                    f"and [K, 4] with K = {k} labels and (H, W) = {input_size}, the padded input size"
                )
            height, width = target["image_size"]
            prepared.append({
                "labels": labels.to(device=device, dtype=torch.int64),
                "boxes": boxes.to(device=device, dtype=torch.float32),
                "masks": masks.to(device=device, dtype=torch.bool),
                "scale": torch.tensor([width, height, width, height], dtype=torch.float32, device=device),
            })  # fmt: skip
        labels = torch.cat([t["labels"] for t in prepared])
        if labels.numel() and ((labels < 0) | (labels >= self.num_classes)).any():
            raise ValueError(f"target labels must be in 0..{self.num_classes - 1} (contiguous class indices)")
        return prepared

    def _prepare(
        self, outputs: ModelOutputs, targets: list[Target]
    ) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]], torch.device]:
        """Stages [stage 1, .., stage S] and the targets with their L1 scale."""
        stages = [*outputs["aux_outputs"], outputs]
        missing = [i for i, s in enumerate(stages, start=1) if "pred_boxes" not in s or "pred_roi_masks" not in s]
        if missing:
            raise ValueError(f"QueryInstCriterion: stages {missing} have no pred_boxes / pred_roi_masks; "
                             "it trains QueryInst outputs only")
        batch = outputs["pred_logits"].shape[0]
        if len(targets) != batch:
            raise ValueError(f"QueryInstCriterion: {len(targets)} targets for a batch of {batch} images")
        device = outputs["pred_logits"].device
        # The pasted masks' grid times their stride is the padded input size.
        grid_h, grid_w = outputs["pred_masks"].shape[-2:]
        input_size = (grid_h * MASK_STRIDE, grid_w * MASK_STRIDE)
        return stages, self._prepare_targets(targets, input_size, device), device

    def _match(
        self,
        stage_index: int,
        stage: dict[str, Tensor],
        previous: dict[str, Tensor] | None,
        previous_matches: Matches | None,
        targets: list[dict[str, Tensor]],
    ) -> Matches:
        """Each stage on its own detached class logits and boxes (Sparse R-CNN)."""
        return self.matcher(stage["pred_logits"].detach(), stage["pred_boxes"].detach(), targets)

    def _matched(
        self, stages: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], matches: list[Matches]
    ) -> list[dict[str, Tensor]]:
        """Every stage with the RoI mask targets of its matched queries added as ``mask_targets``."""
        mask_targets = self._mask_targets(stages, targets, matches)
        return [{**stage, "mask_targets": cut} for stage, cut in zip(stages, mask_targets, strict=True)]

    def _mask_targets(
        self, stages: list, targets: list[dict[str, Tensor]], matches: list[Matches]
    ) -> list[Tensor]:
        """RoI targets of every stage's matched queries, [M_i, m, m] each, image-major as ``_gather``."""
        size = stages[0]["pred_roi_masks"].shape[-1]
        per_stage: list[list[Tensor]] = [[] for _ in stages]
        for b, target in enumerate(targets):
            # One RoIAlign over the image's masks for all stages: the masks are read from memory once.
            boxes = torch.cat([s["pred_boxes"][b, m[b][0]].detach() for s, m in zip(stages, matches, strict=True)])
            tgt_idx = torch.cat([m[b][1] for m in matches])
            cut = roi_mask_targets(target["masks"], boxes, tgt_idx, size=size)
            counts = [m[b][0].numel() for m in matches]
            for i, part in enumerate(cut.split(counts)):
                per_stage[i].append(part)
        return [torch.cat(parts) for parts in per_stage]

    def _stage_losses(
        self,
        stage_index: int,
        stage: dict[str, Tensor],
        targets: list[dict[str, Tensor]],
        matches: Matches,
        num_pos: Tensor,
    ) -> dict[str, Tensor]:
        logits, boxes, roi_masks = stage["pred_logits"], stage["pred_boxes"], stage["pred_roi_masks"]
        mask_targets = stage["mask_targets"]
        batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(matches)])
        pred_idx = torch.cat([p for p, _ in matches])
        tgt = {key: torch.cat([t[key][ti] for t, (_, ti) in zip(targets, matches, strict=True)])
               for key in ("labels", "boxes")}  # fmt: skip
        scale = torch.cat([t["scale"].expand(len(ti), 4) for t, (_, ti) in zip(targets, matches, strict=True)])
        onehot = torch.zeros_like(logits, dtype=torch.float32)
        onehot[batch_idx, pred_idx, tgt["labels"]] = 1.0
        losses = {"cls": sigmoid_focal_loss(logits, onehot) / num_pos * self.cls_weight}
        if pred_idx.numel() == 0:
            # Zero terms keep every parameter in the graph when nothing matched (DDP needs that).
            zero = boxes.sum() * 0 + roi_masks.sum() * 0
            for name in ("l1", "giou", "mask", "dice"):
                losses[name] = zero
            return losses
        pred_boxes = boxes[batch_idx, pred_idx].float()
        l1 = (pred_boxes / scale - tgt["boxes"] / scale).abs().sum()
        giou = generalized_box_iou_loss(pred_boxes, tgt["boxes"], reduction="sum")
        pred_masks = roi_masks[batch_idx, pred_idx].flatten(1)
        flat_targets = mask_targets.flatten(1)
        losses["l1"] = l1 / num_pos * self.l1_weight
        losses["giou"] = giou / num_pos * self.giou_weight
        losses["mask"] = mask_bce_loss(pred_masks, flat_targets) * self.mask_weight
        losses["dice"] = dice_loss(pred_masks, flat_targets, eps=DICE_EPS).sum() / num_pos * self.dice_weight
        return losses
