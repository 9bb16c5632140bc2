"""The keys that flow between dataset, model, criterion and post-processing, declared once.

Shape letters: B batch, N kernels, K targets, C classes, D channels, H/W spatial.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

from torch import Tensor


class Target(TypedDict):
    """One image's instances, in the coordinates of the (resized, padded) network input.

    labels: int64 [K], contiguous class indices 0..C-1.
    masks: bool [K, H, W], at the padded input size of the batch after collate.
    boxes: float32 [K, 4], xyxy in input pixels.
    image_id: the COCO image id.
    orig_size: (H0, W0) of the image as displayed (after EXIF orientation), as in the json.
    image_size: (H, W) after resizing, before padding (the valid region of the input).
    queries: optional float32 [K, C], one vector per instance riding along with it (SP pre-training:
        the saliency query S_l that produced pseudo mask l); absent in supervised data.
    image: uint8 [3, H, W] after collate, a view of this image in the padded batch (FreeSOLO's
        colour-affinity loss reads the pixels from the target); left on the loader's device.
    """

    labels: Tensor
    masks: Tensor
    boxes: Tensor
    image_id: int
    orig_size: tuple[int, int]
    image_size: tuple[int, int]
    queries: NotRequired[Tensor]
    image: NotRequired[Tensor]


class StageOutput(TypedDict):
    """Predictions of one kernel-update stage.

    pred_logits: [B, N, C] classification logits (sigmoid, no background column).
    pred_masks: [B, N, h, w] mask logits at the model's mask stride of the input (K-Net 8; QueryInst, Mask2Former 4).
    pred_kernels: [B, N, D] the kernels after the stage (K^i in the paper).
    pred_boxes: box-based models (QueryInst): [B, N, 4] xyxy boxes in input pixels.
    pred_roi_masks: RoI-mask models (QueryInst): [B, N, m, m] mask logits in the frame of pred_boxes.
    """

    pred_logits: Tensor
    pred_masks: Tensor
    pred_kernels: Tensor
    pred_boxes: NotRequired[Tensor]
    pred_roi_masks: NotRequired[Tensor]


class ModelOutputs(StageOutput):
    """What every QEIS model's forward returns, in training and in evaluation alike.

    The top-level keys are the last stage. aux_outputs holds the earlier stages in order
    (stage 1 .. S-1). init_masks [B, N, h, w] are the masks of the initial kernels K^0 and
    init_kernels [B, N, D] the kernels K^0 themselves (prompts are added to these).
    """

    aux_outputs: list[StageOutput]
    init_masks: Tensor
    init_kernels: Tensor
