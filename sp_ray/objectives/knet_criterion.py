"""K-Net's set criterion: sigmoid focal classification, BCE and dice mask losses (or FreeSOLO's weak mask
losses) per stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sp_ray.models.knet import MASK_STRIDE
from sp_ray.objectives.losses import dice_loss, mask_bce_loss, sigmoid_focal_loss
from sp_ray.objectives.matcher import HungarianMatcher, Matches
from sp_ray.objectives.set_criterion import SetCriterion
from sp_ray.objectives.weak_mask_losses import (
    box_targets,
    color_affinity,
    pairwise_affinity_loss,
    projection_dice_loss,
)
from sp_ray.types import ModelOutputs, Target

MASK_LOSSES = ("full", "weak")


class KNetCriterion(SetCriterion):
    """K-Net set criterion: Hungarian matching per stage, focal class loss, BCE and dice mask losses.

    K-Net (Zhang et al. 2021) section 3.4: stage 0 supervises the initial masks m^0 with
    L = init_mask_weight L_ce + init_dice_weight L_dice, stage i = 1..S the kernels' masks and classes with
    L = cls_weight L_cls + mask_weight L_ce + dice_weight L_dice; the focal class loss is summed over every
    kernel and class and divided by the matched count (``SetCriterion``'s normaliser), BCE and dice are means
    over the matched masks. ``SetCriterion`` runs the stages and names the losses.

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
            (``sp_ray.objectives.weak_mask_losses``) replace BCE and dice at every stage, the initial masks
            included; matching is unchanged. "weak" needs each target's ``image`` (uint8 [3, H, W], the
            padded input that ``collate`` attaches) for the colour affinity.
        projection_weight: weight of ``loss_proj_s{i}`` (max-projection dice), "weak" only.
        avg_projection_weight: weight of ``loss_proj_avg_s{i}`` (average-projection dice), "weak" only.
        pairwise_weight: weight of ``loss_pairwise_s{i}`` after its warmup, "weak" only.
        pairwise_color_threshold: tau of the colour affinity, "weak" only.
        pairwise_warmup_iters: the pairwise weight ramps linearly from 0 over this many calls in training
            mode (FreeSOLO: 1000 iterations); the count lives in the criterion, so a resumed run ramps again.

    ``criterion(outputs, targets, *, return_matches=False)`` (``SetCriterion.forward``) takes the model's
    ``ModelOutputs`` (mask logits at stride 8) and B ``Target`` dicts (``labels`` int64 [K], ``masks`` bool
    [K, H, W] at the padded input size) and returns ``loss_mask_s0``, ``loss_dice_s0`` and, for i = 1..S,
    ``loss_cls_s{i}``, ``loss_mask_s{i}``, ``loss_dice_s{i}``, float scalars already multiplied by their
    weights. With ``mask_loss="weak"``, ``loss_proj_s{i}``, ``loss_proj_avg_s{i}`` and ``loss_pairwise_s{i}``
    (i = 0..S) replace the mask and dice losses. With ``return_matches``, also the matches: a list over
    [init, stage 1, .., stage S] of B pairs (pred_idx, tgt_idx) int64.
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

    @property
    def mask_terms(self) -> tuple[str, ...]:
        """The per-stage mask terms: ``mask`` and ``dice``, or the weak losses' three."""
        return ("mask", "dice") if self.mask_loss == "full" else ("proj", "proj_avg", "pairwise")

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
        """The weighted mask losses of one stage: ``mask`` and ``dice`` ("full") or ``proj``, ``proj_avg`` and
        ``pairwise`` ("weak"), on mask_logits float [B, N, h, w] at the loss stride."""
        batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(matches)])
        pred_idx = torch.cat([p for p, _ in matches])
        names = ("mask", "dice") if self.mask_loss == "full" else ("proj", "proj_avg", "pairwise")
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
            return {"mask": mask_bce_loss(pred, tgt) * mask_w, "dice": dice_loss(pred, tgt).mean() * dice_w}
        affinity = torch.cat(
            [t["affinity"][None].expand(len(ti), -1, -1, -1) for t, (_, ti) in zip(targets, matches, strict=True)]
        )
        warmup = min(1.0, self.calls / self.pairwise_warmup_iters) if self.pairwise_warmup_iters else 1.0
        return {
            "proj": projection_dice_loss(pred, tgt, reduce="max").mean() * self.projection_weight,
            "proj_avg": projection_dice_loss(pred, tgt, reduce="mean").mean() * self.avg_projection_weight,
            "pairwise": pairwise_affinity_loss(pred, affinity, box_targets(tgt)) * (self.pairwise_weight * warmup),
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

    def _prepare(
        self, outputs: ModelOutputs, targets: list[Target]
    ) -> tuple[list[dict[str, Tensor | None]], list[dict[str, Tensor]], torch.device]:
        """Stages [init (masks only), aux stages..., final] and the targets at the loss stride."""
        init_masks = outputs["init_masks"]
        batch, _, h, w = init_masks.shape
        if len(targets) != batch:
            raise ValueError(f"KNetCriterion: {len(targets)} targets for a batch of {batch} images")
        if self.training:
            self.calls += 1
        size = (h * MASK_STRIDE // self.mask_stride, w * MASK_STRIDE // self.mask_stride)
        tgts = self._prepare_targets(targets, (h * MASK_STRIDE, w * MASK_STRIDE), size, init_masks.device)
        stages = [{"pred_logits": None, "pred_masks": init_masks}]
        stages += [{"pred_logits": s["pred_logits"], "pred_masks": s["pred_masks"]} for s in outputs["aux_outputs"]]
        stages.append({"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]})
        return stages, tgts, init_masks.device

    def _stage_inputs(self, stage_index: int, stage: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """The stage's class logits [B, N, C] (None at stage 0) and its mask logits [B, N, h, w] upsampled
        bilinearly from stride 8 to the loss stride."""
        h, w = stage["pred_masks"].shape[-2:]
        size = (h * MASK_STRIDE // self.mask_stride, w * MASK_STRIDE // self.mask_stride)
        masks = F.interpolate(stage["pred_masks"], size=size, mode="bilinear", align_corners=False)
        return {"pred_logits": stage["pred_logits"], "pred_masks": masks}

    def _match(
        self,
        stage_index: int,
        stage: dict[str, Tensor | None],
        previous: dict[str, Tensor | None] | None,
        previous_matches: Matches | None,
        targets: list[dict[str, Tensor]],
    ) -> Matches:
        """Stage 0 on its masks; stage i on stage i-1's detached predictions (``match_previous_stage``, stage 1
        reusing stage 0's matches) or on its own."""
        logits, masks = stage["pred_logits"], stage["pred_masks"]
        if stage_index == 0 or not self.match_previous_stage:
            return self.matcher(None if logits is None else logits.detach(), masks.detach(), targets)
        if previous["pred_logits"] is None:
            return previous_matches
        return self.matcher(previous["pred_logits"].detach(), previous["pred_masks"].detach(), targets)

    def _stage_losses(
        self,
        stage_index: int,
        stage: dict[str, Tensor | None],
        targets: list[dict[str, Tensor]],
        matches: Matches,
        num_pos: Tensor,
    ) -> dict[str, Tensor]:
        if stage_index == 0:
            return self._mask_losses(stage["pred_masks"], targets, matches, initial=True)
        losses = {"cls": self._class_loss(stage["pred_logits"], targets, matches, num_pos) * self.cls_weight}
        losses.update(self._mask_losses(stage["pred_masks"], targets, matches))
        return losses
