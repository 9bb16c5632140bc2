"""The training objective of Mask R-CNN: torchvision's own losses, computed by the model's torchvision parts.

``MaskRCNN`` (``sp_ray.models.maskrcnn``) is pure: its forward gives detections. In training, torchvision's
RPN and RoI heads take the targets (they sample anchors and proposals from them) and return their losses;
``MaskRCNNObjective`` runs the model's ``backbone_features``, ``rpn`` and ``roi_heads`` with the targets in
torchvision's label convention (1..C, 0 = background) and returns that loss dict. It holds no tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sp_ray.types import Target


class MaskRCNNObjective(nn.Module):
    """torchvision's Mask R-CNN losses: ``objective(model, images, targets)`` -> the loss dict."""

    def forward(self, model: nn.Module, images: Tensor, targets: list[Target]) -> dict[str, Tensor]:
        """Every training loss of a ``MaskRCNN`` on a batch (the model in training mode).

        Args:
            model: the ``MaskRCNN``.
            images: float or uint8 [B, 3, H, W], RGB 0..255, H and W multiples of 32 (padded batch).
            targets: training targets at the padded size (boxes xyxy float [K, 4], labels 0..C-1,
                masks bool [K, H, W]), one per image.

        Returns:
            ``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_objectness``, ``loss_rpn_box_reg``,
            float32 scalars.
        """
        if targets is None or len(targets) != images.shape[0]:
            raise ValueError("MaskRCNN in training mode needs one target per image")
        image_list, features = model.backbone_features(images)
        tv_targets = [
            {"boxes": t["boxes"].float(), "labels": t["labels"] + 1, "masks": t["masks"].to(torch.uint8)}
            for t in targets
        ]
        proposals, proposal_losses = model.rpn(image_list, features, tv_targets)
        _, detector_losses = model.roi_heads(features, proposals, image_list.image_sizes, tv_targets)
        losses = {**detector_losses, **proposal_losses}
        # As the set criteria, float32 (torchvision computes them under the step's autocast).
        return {name: value.float() for name, value in losses.items()}
