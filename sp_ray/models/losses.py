"""K-Net training losses: sigmoid focal classification, BCE and dice mask losses (or FreeSOLO's weak mask
losses), and the set criterion."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sp_ray.models.knet import MASK_STRIDE
from sp_ray.models.matcher import HungarianMatcher
from sp_ray.models.weak_mask_losses import (
    box_targets,
    color_affinity,
    pairwise_affinity_loss,
    projection_dice_loss,
)
from sp_ray.types import ModelOutputs, Target

Matches = list[tuple[Tensor, Tensor]]
MASK_LOSSES = ("full", "weak")


def sigmoid_focal_loss(
    logits: Tensor, targets_onehot: Tensor, *, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017, eq. 5), summed; the caller normalises.

    FL = -alpha_t (1 - p_t)^gamma log(p_t), per class and prediction, p = sigmoid(logits).

    Args:
        logits: float [..., C] class logits.
        targets_onehot: float [..., C] in {0, 1}; all zeros for background.
        alpha: weight of the positives (1 - alpha for the negatives).
        gamma: focusing exponent.

    Returns:
        float scalar, the sum over all elements.
    """
    logits = logits.float()
    t = targets_onehot.to(logits.dtype)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return (alpha_t * (1 - p_t).pow(gamma) * ce).sum()


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


def _mean_over_workers(value: Tensor) -> Tensor:
    """Average a scalar over the torch.distributed workers, when there are several."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class KNetCriterion(nn.Module):
    """K-Net set criterion: Hungarian matching per stage, focal class loss, BCE and dice mask losses.

    Losses and matching are computed at stride ``mask_stride`` (4): the stride-8 mask logits are upsampled
    bilinearly and the boolean target masks are resized bilinearly as float, so target borders are soft
    (K-Net ``mask_assign_stride``; METHODS 1.6).

    Args:
        num_classes: C.
        matcher: the Hungarian matcher.
        cls_weight: weight of ``loss_cls_s{i}``.
        mask_weight: weight of ``loss_mask_s{i}``.
        dice_weight: weight of ``loss_dice_s{i}``.
        init_mask_weight: weight of ``loss_mask_s0`` (initial masks m^0).
        init_dice_weight: weight of ``loss_dice_s0``.
        mask_stride: stride of the loss resolution; must divide 8.
        match_previous_stage: True (official K-Net, ``post_assign=False``) matches stage i on the detached
            predictions of stage i-1 (stage 1 on the initial masks, without class cost); False matches
            each stage on its own detached predictions (DETR style).
        mask_loss: "full" (BCE + dice above) or "weak": FreeSOLO's losses for noisy pseudo masks
            (``sp_ray.models.weak_mask_losses``) replace BCE and dice at every stage, the initial masks
            included; matching is unchanged. "weak" needs each target's ``image`` (uint8 [3, H, W], the
            padded input that ``collate`` attaches) for the colour affinity.
        projection_weight: weight of ``loss_proj_s{i}`` (max-projection dice), "weak" only.
        avg_projection_weight: weight of ``loss_proj_avg_s{i}`` (average-projection dice), "weak" only.
        pairwise_weight: weight of ``loss_pairwise_s{i}`` after its warmup, "weak" only.
        pairwise_color_threshold: tau of the colour affinity, "weak" only.
        pairwise_warmup_iters: the pairwise weight ramps linearly from 0 over this many calls in training
            mode (FreeSOLO: 1000 iterations); the count lives in the criterion, so a resumed run ramps again.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        cls_weight: float = 2.0,
        mask_weight: float = 1.0,
        dice_weight: float = 4.0,
        init_mask_weight: float = 1.0,
        init_dice_weight: float = 4.0,
        mask_stride: int = 4,
        match_previous_stage: bool = True,
        mask_loss: str = "full",
        projection_weight: float = 4.0,
        avg_projection_weight: float = 0.4,
        pairwise_weight: float = 1.0,
        pairwise_color_threshold: float = 0.3,
        pairwise_warmup_iters: int = 1000,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"KNetCriterion: num_classes must be >= 1, got {num_classes}")
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"KNetCriterion: mask_loss must be one of {MASK_LOSSES}, got {mask_loss!r}")
        if pairwise_warmup_iters < 0:
            raise ValueError(f"KNetCriterion: pairwise_warmup_iters must be >= 0, got {pairwise_warmup_iters}")
        if mask_stride < 1 or MASK_STRIDE % mask_stride != 0:
            raise ValueError(f"KNetCriterion: mask_stride must divide {MASK_STRIDE}, got {mask_stride}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.cls_weight = cls_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.init_mask_weight = init_mask_weight
        self.init_dice_weight = init_dice_weight
        self.mask_stride = mask_stride
        self.match_previous_stage = match_previous_stage
        self.mask_loss = mask_loss
        self.projection_weight = projection_weight
        self.avg_projection_weight = avg_projection_weight
        self.pairwise_weight = pairwise_weight
        self.pairwise_color_threshold = pairwise_color_threshold
        self.pairwise_warmup_iters = pairwise_warmup_iters
        self.calls = 0  # forward calls in training mode: the clock of the pairwise warmup

    def _prepare_targets(
        self, targets: list[Target], input_size: tuple[int, int], size: tuple[int, int], device: torch.device
    ) -> list[dict[str, Tensor]]:
        prepared = []
        for b, target in enumerate(targets):
            labels, masks = target["labels"], target["masks"]
            if tuple(masks.shape[-2:]) != input_size or masks.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"target {b}: masks {tuple(masks.shape)} must be [K, H, W] with K = {labels.shape[0]} "
                    f"labels and (H, W) = {input_size}, the padded input size"
                )
            masks = masks.to(device=device, dtype=torch.float32)
            if masks.shape[0] == 0:
                small = masks.new_zeros((0, *size))
            else:
                small = F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0]
            entry = {"labels": labels.to(device=device, dtype=torch.int64), "masks": small}
            if self.mask_loss == "weak":
                entry["affinity"] = self._affinity(target, b, input_size, device)
            prepared.append(entry)
        all_labels = torch.cat([t["labels"] for t in prepared]) if prepared else torch.zeros(0)
        if all_labels.numel() and ((all_labels < 0) | (all_labels >= self.num_classes)).any():
            raise ValueError(f"target labels must be in 0..{self.num_classes - 1} (contiguous class indices)")
        return prepared

    def _affinity(
        self, target: Target, index: int, input_size: tuple[int, int], device: torch.device
    ) -> Tensor:
        image = target.get("image")
        if image is None or tuple(image.shape) != (3, *input_size):
            found = None if image is None else tuple(image.shape)
            raise ValueError(
                f"target {index}: loss.mask_loss 'weak' needs the target's 'image' uint8 [3, H, W] at the padded "
                f"input size {input_size}, got {found}; build batches with sp_ray.data.transforms.collate"
            )
        return color_affinity(
            image.to(device),
            image_size=tuple(target["image_size"]),
            stride=self.mask_stride,
            threshold=self.pairwise_color_threshold,
        )

    def _mask_losses(
        self, mask_logits: Tensor, targets: list[dict[str, Tensor]], matches: Matches, *, initial: bool = False
    ) -> dict[str, Tensor]:
        """The weighted mask losses of one stage, named without the stage suffix."""
        batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(matches)])
        pred_idx = torch.cat([p for p, _ in matches])
        names = ("loss_mask", "loss_dice") if self.mask_loss == "full" else (
            "loss_proj", "loss_proj_avg", "loss_pairwise"
        )
        if pred_idx.numel() == 0:
            zero = mask_logits.sum() * 0
            return dict.fromkeys(names, zero)
        pred = mask_logits[batch_idx, pred_idx]  # (M, h, w)
        tgt = torch.cat([t["masks"][ti] for t, (_, ti) in zip(targets, matches, strict=True)])
        if self.mask_loss == "full":
            mask_w, dice_w = (
                (self.init_mask_weight, self.init_dice_weight) if initial else (self.mask_weight, self.dice_weight)
            )
            pred, tgt = pred.flatten(1), tgt.flatten(1)  # (M, P)
            return {"loss_mask": mask_bce_loss(pred, tgt) * mask_w, "loss_dice": dice_loss(pred, tgt).mean() * dice_w}
        affinity = torch.cat(
            [t["affinity"][None].expand(len(ti), -1, -1, -1) for t, (_, ti) in zip(targets, matches, strict=True)]
        )
        warmup = min(1.0, self.calls / self.pairwise_warmup_iters) if self.pairwise_warmup_iters else 1.0
        return {
            "loss_proj": projection_dice_loss(pred, tgt, reduce="max").mean() * self.projection_weight,
            "loss_proj_avg": projection_dice_loss(pred, tgt, reduce="mean").mean() * self.avg_projection_weight,
            "loss_pairwise": pairwise_affinity_loss(pred, affinity, box_targets(tgt))
            * (self.pairwise_weight * warmup),
        }

    def _class_loss(
        self, logits: Tensor, targets: list[dict[str, Tensor]], matches: Matches, num_pos: Tensor
    ) -> Tensor:
        onehot = torch.zeros_like(logits, dtype=torch.float32)
        batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(matches)])
        pred_idx = torch.cat([p for p, _ in matches])
        labels = torch.cat([t["labels"][ti] for t, (_, ti) in zip(targets, matches, strict=True)])
        onehot[batch_idx, pred_idx, labels] = 1.0
        return sigmoid_focal_loss(logits, onehot) / num_pos

    def forward(
        self, outputs: ModelOutputs, targets: list[Target], *, return_matches: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], list[Matches]]:
        """Match and compute the weighted losses of the initial masks and of every stage.

        Args:
            outputs: the model's ``ModelOutputs`` (mask logits at stride 8).
            targets: B ``Target`` dicts; ``labels`` int64 [K], ``masks`` bool [K, H, W] at the padded
                input size.
            return_matches: also return the matches.

        Returns:
            Losses ``loss_mask_s0``, ``loss_dice_s0`` and, for i = 1..S, ``loss_cls_s{i}``,
            ``loss_mask_s{i}``, ``loss_dice_s{i}``, float scalars already multiplied by their weights.
            With ``mask_loss="weak"``, ``loss_proj_s{i}``, ``loss_proj_avg_s{i}`` and ``loss_pairwise_s{i}``
            (i = 0..S) replace the mask and dice losses.
            With ``return_matches``, also the matches: a list over [init, stage 1, .., stage S] of B pairs
            (pred_idx, tgt_idx) int64.
        """
        init_masks = outputs["init_masks"]
        batch, _, h, w = init_masks.shape
        if len(targets) != batch:
            raise ValueError(f"KNetCriterion: {len(targets)} targets for a batch of {batch} images")
        if self.training:
            self.calls += 1
        size = (h * MASK_STRIDE // self.mask_stride, w * MASK_STRIDE // self.mask_stride)
        tgts = self._prepare_targets(targets, (h * MASK_STRIDE, w * MASK_STRIDE), size, init_masks.device)
        stages = [*outputs["aux_outputs"], outputs]

        def upsample(masks: Tensor) -> Tensor:
            return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)

        losses: dict[str, Tensor] = {}
        init_up = upsample(init_masks)
        init_matches = self.matcher(None, init_up.detach(), tgts)
        # Every image gets min(N, K) matches at every stage, so one normaliser serves all stages.
        num_matched = sum(p.numel() for p, _ in init_matches)
        num_pos = _mean_over_workers(torch.tensor(float(num_matched), device=init_masks.device)).clamp(
            min=1.0
        )
        for name, value in self._mask_losses(init_up, tgts, init_matches, initial=True).items():
            losses[f"{name}_s0"] = value
        all_matches = [init_matches]

        prev_logits: Tensor | None = None
        prev_masks = init_up
        for i, stage in enumerate(stages, start=1):
            logits = stage["pred_logits"]
            masks_up = upsample(stage["pred_masks"])
            if not self.match_previous_stage:
                matches = self.matcher(logits.detach(), masks_up.detach(), tgts)
            elif prev_logits is None:
                matches = init_matches
            else:
                matches = self.matcher(prev_logits.detach(), prev_masks.detach(), tgts)
            losses[f"loss_cls_s{i}"] = self._class_loss(logits, tgts, matches, num_pos) * self.cls_weight
            for name, value in self._mask_losses(masks_up, tgts, matches).items():
                losses[f"{name}_s{i}"] = value
            all_matches.append(matches)
            prev_logits, prev_masks = logits, masks_up
        if return_matches:
            return losses, all_matches
        return losses
