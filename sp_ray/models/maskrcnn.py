"""Mask R-CNN (He et al., ICCV 2017), the baseline: torchvision's implementation behind our interface.

The detector is torchvision's own: ``resnet_fpn_backbone`` (ResNet-18/34/50 + FPN + max-pool P6) and
``torchvision.models.detection.MaskRCNN``, the same two calls ``maskrcnn_resnet50_fpn`` makes, built
with no weights and nothing downloaded; a local backbone file goes through the loader K-Net uses.

What ``MaskRCNN`` changes around it, so that both families see the same data and give comparable graphs:

- modules: the detector's parts are held under K-Net's names, ``backbone`` (the ResNet, torchvision
  keys), ``fpn``, ``rpn`` and ``roi_heads``; so ``train.backbone_lr_mult`` applies to the same ResNet
  parameters, and ``finetune --init`` from a K-Net or pre-training checkpoint loads its ResNet.
- input: the padded batch of the data pipeline, float or uint8 [B, 3, H, W] in 0..255, normalised
  inside with the ImageNet mean/std in 0..255 units (as K-Net). The pipeline has already resized
  (``data.short_size`` / ``data.max_size``), so torchvision's ``GeneralizedRCNNTransform`` (resize,
  normalise, pad) is not used: its resize would be the identity on pipeline outputs, and leaving it
  out keeps a data-dependent Resize out of the exported graph.
- labels: contiguous 0..C-1 outside, torchvision's 1..C (0 = background) inside.
- evaluation output: the detections before mask pasting (boxes in input pixels, scores, labels and
  the 28 x 28 mask probabilities of each box), flattened over the batch with a batch index, so that
  the exported graph has one fixed set of outputs and pasting at the original image size happens in
  post-processing (``postprocess_maskrcnn`` here, numpy in the ONNX runtime).
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d

from sp_ray.models.backbone import load_backbone_weights
from sp_ray.models.knet import IMAGENET_MEAN, IMAGENET_STD, SIZE_DIVISOR
from sp_ray.models.postprocess import paste_crops, paste_roi_masks

# torchvision pastes each 28 x 28 mask into its box enlarged by one mask cell on every side.
PASTE_PADDING = 1


class MaskRCNNDetections(TypedDict):
    """What ``MaskRCNN`` returns in evaluation, for a batch of B images (M detections in all).

    boxes: float [M, 4] xyxy in input pixels (clipped to the padded input).
    scores: float [M], descending within each image.
    labels: int64 [M], contiguous 0..C-1.
    masks: float [M, 28, 28] mask probabilities in the frame of each box.
    batch_index: int64 [M], the image each detection belongs to, ascending.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor
    batch_index: Tensor


class MaskRCNN(nn.Module):
    """torchvision's Mask R-CNN parts taking the project's padded 0..255 batches and contiguous labels.

    Args:
        backbone: ResNet body returning the ordered dict {"0": C2, .., "3": C5}.
        fpn: torchvision ``FeaturePyramidNetwork`` (with the max-pool P6 level).
        rpn: torchvision ``RegionProposalNetwork``.
        roi_heads: torchvision ``RoIHeads`` with box and mask branches, C + 1 classes.
        num_classes: C, foreground classes.
    """

    def __init__(
        self, *, backbone: nn.Module, fpn: nn.Module, rpn: nn.Module, roi_heads: nn.Module, num_classes: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = num_classes
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> MaskRCNN:
        """Set train mode, keeping the BatchNorm layers of frozen backbone stages in eval mode."""
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.BatchNorm2d) and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    def backbone_features(self, images: Tensor) -> tuple[ImageList, dict[str, Tensor]]:
        """The normalised batch as torchvision's ``ImageList`` and its FPN features, what ``rpn`` and
        ``roi_heads`` take (also in training, by ``sp_ray.objectives.maskrcnn.MaskRCNNObjective``).

        Args:
            images: float or uint8 [B, 3, H, W], RGB 0..255, H and W multiples of 32 (padded batch).
        """
        _check_images(images)
        x = (images.float() - self.pixel_mean) / self.pixel_std
        # Every image of the padded batch is taken whole, padding included, as K-Net takes it.
        image_list = ImageList(x, [(x.shape[-2], x.shape[-1])] * x.shape[0])
        return image_list, self.fpn(self.backbone(x))

    def forward(self, images: Tensor) -> MaskRCNNDetections:
        """The detections of a batch (evaluation mode; the training losses are ``MaskRCNNObjective``'s).

        Args:
            images: float or uint8 [B, 3, H, W], RGB 0..255, H and W multiples of 32 (padded batch).

        Returns:
            ``MaskRCNNDetections``.

        Raises:
            ValueError: the model is in training mode (torchvision's heads sample training proposals
                from targets there): call ``model.eval()``.
        """
        _check_images(images)
        if self.training:
            raise ValueError(
                "MaskRCNN gives detections in eval mode only (torchvision's heads need targets in training): call "
                "model.eval(); its training losses are sp_ray.objectives.maskrcnn.MaskRCNNObjective's"
            )
        image_list, features = self.backbone_features(images)
        proposals, _ = self.rpn(image_list, features)
        detections, _ = self.roi_heads(features, proposals, image_list.image_sizes)
        return MaskRCNNDetections(
            boxes=torch.cat([d["boxes"] for d in detections]),
            scores=torch.cat([d["scores"] for d in detections]),
            labels=torch.cat([d["labels"] for d in detections]) - 1,
            masks=torch.cat([d["masks"][:, 0] for d in detections]),
            batch_index=torch.cat([torch.full_like(d["labels"], i) for i, d in enumerate(detections)]),
        )


def _check_images(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"MaskRCNN expects images [B, 3, H, W], got {tuple(images.shape)}")
    if images.shape[-2] % SIZE_DIVISOR != 0 or images.shape[-1] % SIZE_DIVISOR != 0:
        raise ValueError(
            f"MaskRCNN input H and W must be multiples of {SIZE_DIVISOR}, "
            f"got {tuple(images.shape[-2:])}; "
            "pad the batch in collate"
        )


def build_maskrcnn(
    *,
    num_classes: int,
    depth: int = 50,
    backbone_weights: str | None = None,
    frozen_stages: int = 1,
    norm_eval: bool = True,
    detections_per_image: int = 100,
    score_threshold: float = 0.0,
    test_proposals: int = 1000,
) -> MaskRCNN:
    """Build torchvision's Mask R-CNN with a ResNet-FPN backbone, randomly initialised, nothing downloaded.

    ``resnet_fpn_backbone`` + ``torchvision.models.detection.MaskRCNN`` with torchvision's defaults
    (anchors, 1000 test proposals, RoIAlign 7 / 14, 4-conv mask head): for depth 50 the same modules
    and state-dict shapes as ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)``.

    Args:
        num_classes: C foreground classes (the heads get C + 1 with background).
        depth: ResNet depth, 18, 34 or 50.
        backbone_weights: local torchvision / MoCo-v2 / DenseCL ResNet file, or None.
        frozen_stages: mmdet semantics as for K-Net (-1 none, 0 stem, s stem + layer1..s); mapped to
            torchvision's ``trainable_layers`` = 5 for -1, else 4 - frozen_stages.
        norm_eval: True uses ``FrozenBatchNorm2d`` (torchvision's default), False trainable BatchNorm.
        detections_per_image: detections kept per image after NMS (``eval.topk``).
        score_threshold: box-score threshold inside the box head; 0 keeps ``detections_per_image``
            detections whenever there are that many candidates (``eval.score_threshold`` applies later).
        test_proposals: RPN proposals per image in evaluation, before and after NMS (torchvision: 1000).

    Returns:
        The ``MaskRCNN``.
    """
    if depth not in (18, 34, 50):
        raise ValueError(f"Mask R-CNN backbone depth must be 18, 34 or 50, got {depth}")
    if not -1 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    backbone = resnet_fpn_backbone(
        backbone_name=f"resnet{depth}",
        weights=None,
        norm_layer=FrozenBatchNorm2d if norm_eval else nn.BatchNorm2d,
        trainable_layers=5 if frozen_stages < 0 else 4 - frozen_stages,
    )
    if backbone_weights is not None:
        # The body holds the ResNet under torchvision's names (conv1 .. layer4, no fc): the layout the
        # loader maps every supported file onto.
        load_backbone_weights(backbone.body, backbone_weights)
    detector = TorchvisionMaskRCNN(
        backbone,
        num_classes=num_classes + 1,
        box_score_thresh=score_threshold,
        box_detections_per_img=detections_per_image,
        rpn_pre_nms_top_n_test=test_proposals,
        rpn_post_nms_top_n_test=test_proposals,
    )
    return MaskRCNN(
        backbone=backbone.body, fpn=backbone.fpn, rpn=detector.rpn, roi_heads=detector.roi_heads,
        num_classes=num_classes,
    )


def postprocess_maskrcnn(
    outputs: MaskRCNNDetections,
    *,
    image_sizes: list[tuple[int, int]],
    orig_sizes: list[tuple[int, int]],
    k: int = 100,
    mask_threshold: float = 0.5,
    score_threshold: float = 0.0,
) -> list[dict[str, Tensor]]:
    """Turn Mask R-CNN detections into instances in original image pixels (same format as K-Net's).

    Boxes are clipped to the valid region and scaled by (W0 / W, H0 / H); each 28 x 28 mask is pasted
    into its scaled box at the original size (torchvision's ``paste_masks_in_image``, one cell of
    padding) and thresholded, box by box (``sp_ray.models.postprocess.paste_roi_masks``).

    Args:
        outputs: ``MaskRCNNDetections`` of a batch of B images.
        image_sizes: B (H, W), the valid (resized, unpadded) region of each input.
        orig_sizes: B (H0, W0), the size of each image on disk.
        k: at most this many detections per image (they are already sorted by score).
        mask_threshold: a pixel is in the mask where the pasted probability > mask_threshold.
        score_threshold: keep detections with score > score_threshold.

    Returns:
        B dicts with ``scores`` float [k'], ``labels`` int64 [k'], ``masks`` bool [k', H0, W0] and
        ``boxes`` float [k', 4] xyxy in original pixels.
    """
    if len(image_sizes) != len(orig_sizes):
        raise ValueError(
            f"postprocess_maskrcnn: {len(image_sizes)} image_sizes but {len(orig_sizes)} orig_sizes"
        )
    results = []
    for b, ((valid_h, valid_w), (out_h, out_w)) in enumerate(zip(image_sizes, orig_sizes, strict=True)):
        keep = (outputs["batch_index"] == b) & (outputs["scores"] > score_threshold)
        scores = outputs["scores"][keep][:k].float()
        boxes = outputs["boxes"][keep][:k].float()
        limits = boxes.new_tensor([valid_w, valid_h, valid_w, valid_h])
        boxes = torch.minimum(boxes.clamp(min=0), limits) * boxes.new_tensor(
            [out_w / valid_w, out_h / valid_h, out_w / valid_w, out_h / valid_h]
        )
        probs = outputs["masks"][keep][:k].float()
        mask_boxes, crops = paste_roi_masks(probs, boxes, orig_size=(out_h, out_w), mask_threshold=mask_threshold,
                                            padding=PASTE_PADDING)
        results.append(
            {
                "scores": scores,
                "labels": outputs["labels"][keep][:k],
                "masks": paste_crops(mask_boxes, crops, (out_h, out_w)),
                "boxes": boxes,
            }
        )
    return results
